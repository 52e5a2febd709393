//! One line of the ledger file: a stored policy, checked before it is written and when the file
//! is read back, with the same rules both times.
//!
//! The check at write time is what lets the start-up scan reject anything it finds wrong: a
//! line this member wrote always passes it.

use ledger_anylog::policy;

/// A policy line, valid and without its line break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyLine {
    /// The policy's `id` attribute: the key of the member's index.
    pub id: String,
    /// The line as the master sent it (`Policy.json`), written byte for byte.
    pub text: String,
}

/// Why a text cannot be a line of the ledger file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// A line break inside would split the policy over two lines.
    #[error("it holds a line break")]
    LineBreak,
    /// It is not a stored policy.
    #[error("{0}")]
    Invalid(#[from] policy::PolicyError),
    /// A stored policy always has its id.
    #[error("its body has no string `id`")]
    NoId,
}

impl PolicyLine {
    /// Checks `text` (one line, without its break) and finds its id.
    pub fn parse(text: String) -> Result<PolicyLine, LineError> {
        if text.contains(['\n', '\r']) {
            return Err(LineError::LineBreak);
        }
        let (_, body) = policy::parse_stored(&text)?;
        let id = match body.get("id") {
            Some(serde_json::Value::String(id)) => id.clone(),
            _ => return Err(LineError::NoId),
        };
        Ok(PolicyLine { id, text })
    }

    /// The bytes it takes in the file, its line break included.
    pub fn file_len(&self) -> u64 {
        self.text.len() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_policy_is_a_line() {
        let text = r#"{"operator": {"name": "op1", "id": "abc", "date": "2026-01-01T00:00:00.000000Z", "ledger": "global"}}"#;
        let line = PolicyLine::parse(text.to_string()).unwrap();
        assert_eq!(line.id, "abc");
        assert_eq!(line.file_len(), text.len() as u64 + 1);
    }

    #[test]
    fn what_a_reader_would_choke_on_is_refused() {
        for (text, error) in [
            (r#"{"operator": {"name": "op1", "id": "a"}"#, None),
            (r#"{"operator": {"name": "op1"}}"#, Some(LineError::NoId)),
            (r#"{"operator": {"id": 5}}"#, None),
            (
                "{\"operator\": {\"id\": \"a\",\n\"x\": 1}}",
                Some(LineError::LineBreak),
            ),
            (r#"["operator"]"#, None),
        ] {
            let got = PolicyLine::parse(text.to_string()).unwrap_err();
            if let Some(error) = error {
                assert_eq!(got, error, "{text}");
            }
        }
    }
}
