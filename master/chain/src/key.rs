//! The private key of the account the master writes from (`--ethereum-key-file`).
//!
//! The file holds the key as 64 hexadecimal digits, with or without `0x`, with any whitespace
//! around it (a trailing newline, as `echo` and editors leave). Errors name the file and what is
//! wrong, never the file's content: it is a secret.

use std::path::{Path, PathBuf};

use alloy::signers::local::PrivateKeySigner;

/// Why a key file gave no key.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read the Ethereum key file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a private key.
    #[error("the Ethereum key file {} does not hold a private key: {problem} (expected 64 hexadecimal digits, with or without 0x)", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the content).
        problem: String,
    },
}

/// Reads the private key in `path`.
pub fn read_key_file(path: &Path) -> Result<PrivateKeySigner, KeyFileError> {
    let text = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |problem: String| KeyFileError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let text = String::from_utf8(text).map_err(|_| invalid("it is not text".into()))?;
    parse_key(&text).map_err(invalid)
}

/// Parses a private key written as 64 hexadecimal digits, with or without `0x`, surrounding
/// whitespace ignored. The error says what is wrong without repeating the text.
pub fn parse_key(text: &str) -> Result<PrivateKeySigner, String> {
    let text = text.trim();
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() {
        return Err("it is empty".into());
    }
    if let Some(at) = digits.find(|c: char| !c.is_ascii_hexdigit()) {
        let what = if digits[at..].starts_with(char::is_whitespace) {
            "whitespace inside the key"
        } else {
            "a character that is not a hexadecimal digit"
        };
        return Err(format!("{what} at position {}", at + 1));
    }
    if digits.len() != 64 {
        return Err(format!("{} hexadecimal digits, not 64", digits.len()));
    }
    let bytes: [u8; 32] = alloy::hex::decode(digits)
        .map_err(|_| "not hexadecimal".to_string())?
        .try_into()
        .map_err(|_| "not 32 bytes".to_string())?;
    PrivateKeySigner::from_bytes(&bytes.into()).map_err(|_| {
        "not a valid secp256k1 private key (zero, or not below the curve order)".into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ganache's first deterministic account.
    const KEY: &str = "4f3edf983ac636a65a842ce7c78d9aa706d3b113bce9c46f30d7d21715b23b1d";
    const ADDRESS: &str = "0x90F8bf6A479f320ead074411a4B0e7944Ea8c9C1";

    #[test]
    fn keys_with_or_without_0x_and_whitespace() {
        for text in [
            KEY.to_string(),
            format!("0x{KEY}"),
            format!("  0x{KEY}\n"),
            format!("\t{}\r\n", KEY.to_uppercase()),
            format!("0X{KEY}"),
        ] {
            let signer = parse_key(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(signer.address().to_checksum(None), ADDRESS);
        }
    }

    #[test]
    fn bad_keys_are_refused_without_echoing_them() {
        let cases = [
            ("", "it is empty"),
            ("  \n", "it is empty"),
            ("0x", "it is empty"),
            (&KEY[..63], "63 hexadecimal digits, not 64"),
            ("secret-words not a key", "not a hexadecimal digit"),
            ("4f3e df98", "whitespace inside the key"),
        ];
        for (text, want) in cases {
            let problem = parse_key(text)
                .err()
                .unwrap_or_else(|| panic!("{text:?} accepted"));
            assert!(problem.contains(want), "{text:?}: {problem}");
            assert!(
                text.trim().is_empty() || !problem.contains(text.trim()),
                "{problem}"
            );
        }
        let zero = "0".repeat(64);
        assert!(parse_key(&zero).unwrap_err().contains("not a valid"));
    }

    #[test]
    fn key_files_are_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.key");
        std::fs::write(&good, format!("0x{KEY}\n")).unwrap();
        assert_eq!(
            read_key_file(&good).unwrap().address().to_checksum(None),
            ADDRESS
        );

        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "my secret passphrase\n").unwrap();
        let message = read_key_file(&bad).unwrap_err().to_string();
        assert!(message.contains("bad.key"), "{message}");
        assert!(!message.contains("passphrase"), "{message}");

        let missing = dir.path().join("missing.key");
        let message = read_key_file(&missing).unwrap_err().to_string();
        assert!(message.contains("missing.key"), "{message}");
    }
}
