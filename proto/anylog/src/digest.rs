//! The digest of a ledger: the md5 of its `blockchain.json`, every line followed by `\n`.
//! The master answers it in `GetLedgerInfo`, and a member's file has it when in sync; EdgeLake
//! nodes compare it to decide whether to fetch the ledger again.

use md5::{Digest, Md5};

/// A ledger's digest, extended one line at a time.
#[derive(Clone, Debug, Default)]
pub struct LedgerDigest(Md5);

impl LedgerDigest {
    /// The digest of an empty ledger (an empty file).
    pub fn new() -> Self {
        LedgerDigest(Md5::new())
    }

    /// Adds one line (its text, without the line break).
    pub fn push_line(&mut self, line: &str) {
        self.0.update(line.as_bytes());
        self.0.update(b"\n");
    }

    /// Adds bytes as they are in the file (whole lines with their breaks).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest so far, as lower-case hex, without consuming it.
    pub fn hex(&self) -> String {
        hex::encode(self.md5())
    }

    /// The digest so far, as its 16 bytes, without consuming it (a member's state record keeps
    /// them, and goes on extending the digest).
    pub fn md5(&self) -> [u8; 16] {
        self.0.clone().finalize().into()
    }
}

/// Bytes written are added as they are in the file ([`LedgerDigest::push_bytes`]), so a file can
/// be hashed with `io::copy` without being held in memory.
impl std::io::Write for LedgerDigest {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.push_bytes(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The digest of the ledger made of `lines`, in order.
pub fn of_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut digest = LedgerDigest::new();
    for line in lines {
        digest.push_line(line);
    }
    digest.hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_the_md5_of_the_file() {
        assert_eq!(of_lines([]), "d41d8cd98f00b204e9800998ecf8427e");
        let mut digest = LedgerDigest::new();
        digest.push_bytes(b"a\n");
        digest.push_line("b");
        assert_eq!(digest.hex(), of_lines(["a", "b"]));
        assert_eq!(digest.hex(), hex::encode(Md5::digest(b"a\nb\n")));
        assert_eq!(digest.md5(), <[u8; 16]>::from(Md5::digest(b"a\nb\n")));
        // Not consumed: it goes on.
        std::io::Write::write_all(&mut digest, b"c\n").unwrap();
        assert_eq!(digest.hex(), of_lines(["a", "b", "c"]));
    }
}
