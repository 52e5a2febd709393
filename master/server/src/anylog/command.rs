//! The command texts an EdgeLake node sends its master, parsed into [`Request`]s.
//!
//! Words are separated by a space; a space inside one argument (a file path, the phrase
//! `push ignore`) travels as a tab, so both separate the leading words. The policy JSON of a push
//! is the rest of the text, taken as it is.

use ledger_anylog::wire::error_code;

/// What a node asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `event get_blockchain <dest> <md5> <trace>`: send the ledger file to `dest` on the node
    /// unless the node's file has this md5.
    GetBlockchain {
        /// The node's path for the file (tabs turned back into spaces).
        dest: String,
        /// The md5 hex of the node's file, or `0` when it has none.
        md5: String,
    },
    /// `blockchain push <json>` / `blockchain push ignore <json>`: insert a policy.
    Push {
        /// The policy text.
        json: String,
        /// `ignore`: a duplicate id is not an error.
        ignore_duplicate: bool,
    },
    /// `blockchain drop policy where id = <id>[,<id>...]`: delete policies.
    DropIds(Vec<String>),
    /// `blockchain drop policy <json>`: delete the policy the JSON names (its `id`, or the id
    /// the JSON completes to).
    DropPolicy(String),
    /// `file get !blockchain_file [<dest>]`: send the ledger file to `dest` on the node, as a
    /// plain file.
    FileGet {
        /// The node's path for the file.
        dest: String,
    },
    /// `file write <name>`: a file arrives; with the large-message flag it holds a command.
    FileWrite {
        /// The file's name.
        name: String,
    },
    /// `echo ...` or `print ...`: a node reports something; never answered, lest two nodes
    /// echo each other forever.
    Report(String),
}

/// A command that cannot be served, with the code and text of the echo that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The EdgeLake status code for the node.
    pub code: u16,
    /// What is wrong.
    pub reason: String,
    /// The command's leading words (`get status`, `blockchain get`), to log each once.
    pub words: String,
}

/// The ledger file's name in `file get`, which a node's script writes as `!!blockchain_file`.
const LEDGER_FILE_VARIABLE: &str = "!blockchain_file";

/// Parses one command text.
pub fn parse(command: &str) -> Result<Request, Refusal> {
    let text = command.trim_start_matches([' ', '\t']);
    let (first, rest) = split_word(text);
    match first {
        "event" => {
            let (event, rest) = split_word(rest);
            if event != "get_blockchain" {
                return Err(unsupported(&format!("event {event}"), text));
            }
            let args: Vec<&str> = rest.split(' ').filter(|w| !w.is_empty()).collect();
            let [dest, md5, _trace] = args[..] else {
                return Err(Refusal {
                    code: error_code::MISSING_FILE_NAME,
                    reason: format!(
                        "event get_blockchain takes a file name, an md5 and a trace level; got {} words",
                        args.len()
                    ),
                    words: "event get_blockchain".into(),
                });
            };
            Ok(Request::GetBlockchain {
                dest: untab(dest),
                md5: md5.trim().to_string(),
            })
        }
        "blockchain" => parse_blockchain(rest, text),
        "file" => {
            let (verb, rest) = split_word(rest);
            let args: Vec<&str> = rest.split(' ').filter(|w| !w.is_empty()).collect();
            match (verb, &args[..]) {
                ("get", [source, dest @ ..]) if dest.len() <= 1 => {
                    let source = untab(source);
                    if source.trim_start_matches('!') != &LEDGER_FILE_VARIABLE[1..] {
                        return Err(Refusal {
                            code: error_code::FILE_READ_FAILED,
                            reason: format!(
                                "a Ledger master serves only its ledger ({LEDGER_FILE_VARIABLE}), not {source:?}"
                            ),
                            words: "file get".into(),
                        });
                    }
                    let dest = dest.first().map(|d| untab(d)).unwrap_or_default();
                    if dest.is_empty() {
                        return Err(Refusal {
                            code: error_code::MISSING_FILE_NAME,
                            reason: "file get needs the destination path on the node".into(),
                            words: "file get".into(),
                        });
                    }
                    Ok(Request::FileGet { dest })
                }
                ("write", [name]) => Ok(Request::FileWrite { name: untab(name) }),
                _ => Err(Refusal {
                    code: error_code::COMMAND_STRUCTURE,
                    reason: format!("unsupported form of the file command: {}", clip(text)),
                    words: format!("file {verb}"),
                }),
            }
        }
        "echo" | "print" => Ok(Request::Report(rest.to_string())),
        _ => {
            let (second, _) = split_word(rest);
            Err(unsupported(&format!("{first} {second}"), text))
        }
    }
}

fn parse_blockchain(rest: &str, text: &str) -> Result<Request, Refusal> {
    let (verb, rest) = split_word(rest);
    match verb {
        "push" => {
            let (maybe_ignore, after) = split_word(rest);
            let (ignore_duplicate, json) = if maybe_ignore == "ignore" {
                (true, after)
            } else {
                (false, rest)
            };
            if json.trim().is_empty() {
                return Err(Refusal {
                    code: error_code::COMMAND_STRUCTURE,
                    reason: "blockchain push carries no policy".into(),
                    words: "blockchain push".into(),
                });
            }
            Ok(Request::Push {
                json: json.to_string(),
                ignore_duplicate,
            })
        }
        "drop" => {
            let (what, rest) = split_word(rest);
            if what != "policy" {
                return Err(unsupported(&format!("blockchain drop {what}"), text));
            }
            let rest = rest.trim_matches([' ', '\t']);
            if rest.starts_with('{') {
                return Ok(Request::DropPolicy(rest.to_string()));
            }
            let (where_word, condition) = split_word(rest);
            let ids = condition
                .trim()
                .strip_prefix("id")
                .map(str::trim_start)
                .and_then(|c| c.strip_prefix('='))
                .filter(|_| where_word == "where");
            let ids: Vec<String> = ids
                .unwrap_or_default()
                .split(',')
                .map(|id| id.trim().trim_matches(['"', '\'']).to_string())
                .filter(|id| !id.is_empty())
                .collect();
            if ids.is_empty() {
                return Err(Refusal {
                    code: error_code::COMMAND_STRUCTURE,
                    reason: "expected blockchain drop policy where id = <id>".into(),
                    words: "blockchain drop".into(),
                });
            }
            Ok(Request::DropIds(ids))
        }
        other => Err(unsupported(&format!("blockchain {other}"), text)),
    }
}

fn unsupported(words: &str, command: &str) -> Refusal {
    Refusal {
        code: error_code::UNRECOGNIZED_COMMAND,
        reason: format!(
            "command '{}' is not supported by this Ledger master",
            clip(command.trim())
        ),
        words: clip(words.trim()).to_string(),
    }
}

/// The first word of `text` (up to a space or a tab) and what follows that one separator.
fn split_word(text: &str) -> (&str, &str) {
    match text.find([' ', '\t']) {
        Some(at) => (&text[..at], &text[at + 1..]),
        None => (text, ""),
    }
}

/// A word whose spaces travelled as tabs.
fn untab(word: &str) -> String {
    word.replace('\t', " ")
}

/// At most 200 characters of a command or a node's text, for logs and echoes.
pub(crate) fn clip(text: &str) -> &str {
    match text.char_indices().nth(200) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_nodes_send() {
        assert_eq!(
            parse("event get_blockchain /app/EdgeLake/blockchain/blockchain.new 0 0"),
            Ok(Request::GetBlockchain {
                dest: "/app/EdgeLake/blockchain/blockchain.new".into(),
                md5: "0".into()
            })
        );
        assert_eq!(
            parse(
                "event get_blockchain /my\tdir/blockchain.new d41d8cd98f00b204e9800998ecf8427e 2"
            ),
            Ok(Request::GetBlockchain {
                dest: "/my dir/blockchain.new".into(),
                md5: "d41d8cd98f00b204e9800998ecf8427e".into()
            })
        );
        let json = r#"{"config": {"a": "x y\tz", "id": "1", "date": "d"}}"#;
        assert_eq!(
            parse(&format!("blockchain push {json}")),
            Ok(Request::Push {
                json: json.into(),
                ignore_duplicate: false
            })
        );
        for sep in ["\t", " "] {
            assert_eq!(
                parse(&format!("blockchain push{sep}ignore {json}")),
                Ok(Request::Push {
                    json: json.into(),
                    ignore_duplicate: true
                })
            );
        }
        assert_eq!(
            parse("blockchain drop policy where id = 0d69b1e80a299a368ae9d22b146e980c"),
            Ok(Request::DropIds(vec![
                "0d69b1e80a299a368ae9d22b146e980c".into()
            ]))
        );
        assert_eq!(
            parse("blockchain drop policy where id=a, b ,'c'"),
            Ok(Request::DropIds(vec!["a".into(), "b".into(), "c".into()]))
        );
        assert_eq!(
            parse(r#"blockchain drop policy {"table": {"name": "t", "dbms": "d"}}"#),
            Ok(Request::DropPolicy(
                r#"{"table": {"name": "t", "dbms": "d"}}"#.into()
            ))
        );
        assert_eq!(
            parse("file get !blockchain_file /n/my\tledger.json"),
            Ok(Request::FileGet {
                dest: "/n/my ledger.json".into()
            })
        );
        assert_eq!(
            parse("file write cmd.10.0.0.1.7.lmsg"),
            Ok(Request::FileWrite {
                name: "cmd.10.0.0.1.7.lmsg".into()
            })
        );
        assert_eq!(
            parse("echo Command 'x' not recognized"),
            Ok(Request::Report("Command 'x' not recognized".into()))
        );
    }

    #[test]
    fn refusals_name_the_command() {
        let refusal = parse("get status").unwrap_err();
        assert_eq!(refusal.code, error_code::UNRECOGNIZED_COMMAND);
        assert_eq!(refusal.words, "get status");
        assert!(
            refusal.reason.contains("'get status'"),
            "{}",
            refusal.reason
        );
        assert_eq!(
            parse("blockchain get *").unwrap_err().words,
            "blockchain get"
        );
        assert_eq!(parse("").unwrap_err().words, "");
        assert_eq!(
            parse("event get_blockchain /x 0").unwrap_err().code,
            error_code::MISSING_FILE_NAME
        );
        assert_eq!(
            parse("blockchain push ").unwrap_err().code,
            error_code::COMMAND_STRUCTURE
        );
        assert_eq!(
            parse("blockchain drop policy where name = x")
                .unwrap_err()
                .code,
            error_code::COMMAND_STRUCTURE
        );
        let refusal = parse("file get /etc/passwd /tmp/x").unwrap_err();
        assert_eq!(refusal.code, error_code::FILE_READ_FAILED);
        assert_eq!(
            parse("file get !blockchain_file").unwrap_err().code,
            error_code::MISSING_FILE_NAME
        );
        // A hostile word is clipped in what is logged and echoed.
        let long = format!("x{} y", "z".repeat(5000));
        let refusal = parse(&long).unwrap_err();
        assert!(refusal.words.len() <= 200 && refusal.reason.len() < 300);
        // The echo quotes the command, as a node's own does.
        assert!(
            parse("blockchain get operator where company = Acme")
                .unwrap_err()
                .reason
                .contains("'blockchain get operator where company = Acme'")
        );
    }
}
