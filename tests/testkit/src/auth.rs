//! Auth files for `--auth-file`, written the way an operator writes them: tokens stored as their
//! SHA-256 (the master's own `token_hash`), certificate subjects by common name, each with a role.

use std::fmt::Write as _;
use std::path::Path;

use ledger_server::auth::token_hash;

/// An auth file being written: add callers, then [`AuthFile::write`] it.
#[derive(Debug, Default)]
pub struct AuthFile {
    toml: String,
}

impl AuthFile {
    /// An auth file with no caller yet.
    pub fn new() -> AuthFile {
        AuthFile::default()
    }

    /// A caller that presents `token` as a bearer token, named `name`, with `role`.
    pub fn token(mut self, name: &str, role: &str, token: &str) -> AuthFile {
        let _ = write!(
            self.toml,
            "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            token_hash(token)
        );
        self
    }

    /// A caller known by the common name `cn` of its client certificate, with `role`.
    pub fn subject(mut self, cn: &str, role: &str) -> AuthFile {
        let _ = write!(self.toml, "[[subject]]\ncn = \"{cn}\"\nrole = \"{role}\"\n");
        self
    }

    /// Writes the file at `path` and returns the path, for `--auth-file`.
    pub fn write(&self, path: &Path) -> String {
        std::fs::write(path, &self.toml)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.display().to_string()
    }
}
