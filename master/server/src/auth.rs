//! Who may do what. Readers may stream and query, writers may also insert, admins may also
//! delete. Roles come from bearer tokens in the `authorization` metadata, configured in a file
//! that holds only their SHA-256 hashes, and from the common name of a verified client
//! certificate (mTLS).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::SecurityError;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Stream and query.
    Reader,
    /// Also insert.
    Writer,
    /// Also delete.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        })
    }
}

/// A caller the master recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name the file gives it (a token's name or the certificate's common name).
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials: no `authorization` metadata and no client certificate.
    #[error(
        "credentials required: an `authorization: Bearer TOKEN` header or a client certificate"
    )]
    CredentialsMissing,
    /// `authorization` metadata that is not `Bearer TOKEN`.
    #[error("the authorization metadata must be `Bearer TOKEN`")]
    MalformedAuthorization,
    /// A token the auth file does not name.
    #[error("unknown token")]
    UnknownToken,
    /// A verified client certificate whose common name the auth file does not name.
    #[error("the client certificate {0:?} names no known subject")]
    UnknownSubject(String),
    /// A known caller whose role does not allow the call.
    #[error("{name} is a {role} and may not {action}: that needs the {needed} role")]
    PermissionDenied {
        /// The caller.
        name: String,
        /// Its role.
        role: Role,
        /// The role the call needs.
        needed: Role,
        /// What it tried.
        action: &'static str,
    },
}

impl AuthError {
    /// Whether the caller is unknown (UNAUTHENTICATED), rather than known and not allowed.
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(self, AuthError::PermissionDenied { .. })
    }
}

/// What is wrong in the text of an auth file.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// It is not TOML of the expected form (unknown keys and roles included).
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// A token's `sha256` is not 64 hex digits.
    #[error("token {0:?}: sha256 must be 64 hex digits (the hash, not the token)")]
    BadHash(String),
    /// Two tokens have the same hash: one token, two names.
    #[error("two tokens have the same hash")]
    DuplicateHash,
    /// Nobody is named.
    #[error("it names no token and no subject: nobody could call")]
    Empty,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    subject: Vec<SubjectEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    /// Hex SHA-256 of the token: the file never holds a usable secret.
    sha256: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubjectEntry {
    /// The common name of a client certificate the TLS layer verified.
    cn: String,
    role: Role,
}

/// The configured callers.
#[derive(Debug, Default)]
pub struct Authorizer {
    tokens: HashMap<[u8; 32], Identity>,
    subjects: HashMap<String, Identity>,
}

/// The SHA-256 of a token, as the auth file stores it (hex).
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Authorizer {
    /// Reads the auth file (TOML, see README "Security").
    pub fn load(path: &Path) -> Result<Self, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecurityError::ReadAuthFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| SecurityError::AuthFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses the text of an auth file.
    pub fn parse(text: &str) -> Result<Self, AuthFileError> {
        let file: AuthFile = toml::from_str(text)?;
        let mut authorizer = Authorizer::default();
        for entry in file.token {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(entry.sha256.trim(), &mut hash)
                .map_err(|_| AuthFileError::BadHash(entry.name.clone()))?;
            let identity = Identity {
                name: entry.name,
                role: entry.role,
            };
            if authorizer.tokens.insert(hash, identity).is_some() {
                return Err(AuthFileError::DuplicateHash);
            }
        }
        for entry in file.subject {
            let identity = Identity {
                name: entry.cn.clone(),
                role: entry.role,
            };
            authorizer.subjects.insert(entry.cn, identity);
        }
        if authorizer.tokens.is_empty() && authorizer.subjects.is_empty() {
            return Err(AuthFileError::Empty);
        }
        Ok(authorizer)
    }

    /// Who is calling, from the `authorization: Bearer TOKEN` metadata or, without it, the
    /// verified client certificate's common name; and whether that caller may do `action`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        certificate_cn: Option<&str>,
        needed: Role,
        action: &'static str,
    ) -> Result<Identity, AuthError> {
        let identity = match metadata.get("authorization") {
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .ok_or(AuthError::MalformedAuthorization)?;
                let hash: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
                self.tokens.get(&hash).ok_or(AuthError::UnknownToken)?
            }
            None => match certificate_cn {
                Some(cn) => self
                    .subjects
                    .get(cn)
                    .ok_or_else(|| AuthError::UnknownSubject(cn.to_string()))?,
                None => return Err(AuthError::CredentialsMissing),
            },
        };
        if identity.role < needed {
            return Err(AuthError::PermissionDenied {
                name: identity.name.clone(),
                role: identity.role,
                needed,
                action,
            });
        }
        Ok(identity.clone())
    }
}

/// The common name of the first (leaf) certificate of a verified TLS client, if any.
pub fn certificate_common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = certificate.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(token: Option<&str>) -> MetadataMap {
        let mut map = MetadataMap::new();
        if let Some(token) = token {
            map.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        map
    }

    fn authorizer() -> Authorizer {
        Authorizer::parse(&format!(
            "[[token]]\nname = \"ingest\"\nrole = \"writer\"\nsha256 = \"{}\"\n\
             [[subject]]\ncn = \"member-1\"\nrole = \"reader\"\n",
            token_hash("s3cret")
        ))
        .unwrap()
    }

    #[test]
    fn roles_come_from_tokens_and_subjects() {
        let auth = authorizer();
        let writer = auth
            .authorize(&metadata(Some("s3cret")), None, Role::Writer, "insert")
            .unwrap();
        assert_eq!(
            (writer.name.as_str(), writer.role),
            ("ingest", Role::Writer)
        );
        assert!(matches!(
            auth.authorize(&metadata(Some("s3cret")), None, Role::Admin, "delete"),
            Err(AuthError::PermissionDenied { .. })
        ));
        let reader = auth
            .authorize(&metadata(None), Some("member-1"), Role::Reader, "stream")
            .unwrap();
        assert_eq!(reader.role, Role::Reader);
        assert!(matches!(
            auth.authorize(&metadata(None), Some("member-1"), Role::Writer, "insert"),
            Err(AuthError::PermissionDenied { .. })
        ));
    }

    #[test]
    fn missing_or_wrong_credentials_are_unauthenticated() {
        let auth = authorizer();
        for (token, cn, expected) in [
            (None, None, AuthError::CredentialsMissing),
            (Some("wrong"), None, AuthError::UnknownToken),
            (
                None,
                Some("stranger"),
                AuthError::UnknownSubject("stranger".into()),
            ),
        ] {
            let refused = auth
                .authorize(&metadata(token), cn, Role::Reader, "stream")
                .unwrap_err();
            assert_eq!(refused, expected);
            assert!(refused.is_unauthenticated());
        }
        let mut basic = MetadataMap::new();
        basic.insert("authorization", "Basic czNjcmV0".parse().unwrap());
        assert_eq!(
            auth.authorize(&basic, None, Role::Reader, "stream"),
            Err(AuthError::MalformedAuthorization)
        );
    }

    #[test]
    fn the_file_holds_hashes_only_and_names_someone() {
        assert!(matches!(
            Authorizer::parse(
                "[[token]]\nname = \"x\"\nrole = \"admin\"\nsha256 = \"plaintext\"\n"
            ),
            Err(AuthFileError::BadHash(name)) if name == "x"
        ));
        assert!(matches!(Authorizer::parse(""), Err(AuthFileError::Empty)));
        assert!(matches!(
            Authorizer::parse("[[token]]\nname = \"x\"\nrole = \"root\"\nsha256 = \"00\"\n"),
            Err(AuthFileError::Toml(_))
        ));
        let hash = token_hash("same");
        assert!(matches!(
            Authorizer::parse(&format!(
                "[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{hash}\"\n\
                 [[token]]\nname = \"b\"\nrole = \"reader\"\nsha256 = \"{hash}\"\n"
            )),
            Err(AuthFileError::DuplicateHash)
        ));
    }
}
