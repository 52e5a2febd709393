//! AnyLog's TCP message format, as EdgeLake nodes speak it to their master: fixed 2048-byte
//! blocks, each a 207-byte header then the command text, an (empty) auth string and data.
//!
//! Every message travels on a connection of its own, and an answer never comes back on it: the
//! receiver opens a connection to the sender's TCP server, whose address the header carries.
//! This module only encodes and decodes; [`read_message`] and [`write_message`] move one message
//! over any tokio stream.
//!
//! Written from the facts in the project's protocol notes (block layout, counters, the split of
//! data over blocks), not from EdgeLake's code.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The size of every block on the wire.
pub const BLOCK_SIZE: usize = 2048;
/// The size of a block's header; the command starts right after it.
pub const HEADER_SIZE: usize = 207;
/// The most bytes of command, auth and data one block holds.
pub const PAYLOAD_SIZE: usize = BLOCK_SIZE - HEADER_SIZE;
/// The longest source address text the header holds.
pub const MAX_IP_LEN: usize = 128;
/// HTTP/2's client preface: how a gRPC connection starts, which no AnyLog block does.
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Header offsets (all integers big-endian).
const OFF_BLOCK_COUNTER: usize = 30;
const OFF_LAST: usize = 35;
const OFF_INFO_TYPE: usize = 36;
const OFF_ERROR: usize = 37;
const OFF_COMMAND_LEN: usize = 39;
const OFF_AUTH_LEN: usize = 41;
const OFF_DATA_LEN: usize = 43;
/// Job location (2 bytes) and job id (4): a node routes an answer that carries its job id to the
/// REST call waiting for it, so answers copy them from the request.
const OFF_JOB: usize = 50;
const JOB_LEN: usize = 6;
const OFF_IP_LEN: usize = 72;
const OFF_IP: usize = 73;
const OFF_PORT: usize = 201;
const OFF_GENERIC_FLAG: usize = 205;

/// What the generic flag of a `file write` says the file is.
pub mod generic_flag {
    /// A plain file, written where its name says (`file get` answers).
    pub const PLAIN: u16 = 0;
    /// A ledger file: the node merges its local policies into it and makes it its ledger.
    pub const LEDGER_FILE: u16 = 2;
    /// A large message: the file holds a command too long for one block.
    pub const LARGE_MESSAGE: u16 = 3;
}

/// Info types, which receivers do not check; senders set them as EdgeLake's do.
pub mod info_type {
    /// A node's command to another node.
    pub const COMMAND: u8 = 6;
    /// The echo that answers a failed `blockchain` command.
    pub const BLOCKCHAIN_ECHO: u8 = 2;
    /// Any other echo.
    pub const ECHO: u8 = 4;
}

/// The error codes of EdgeLake's status list that a master sends in its echoes.
pub mod error_code {
    /// An unrecognised command.
    pub const UNRECOGNIZED_COMMAND: u16 = 1;
    /// A command whose words are not as expected.
    pub const COMMAND_STRUCTURE: u16 = 2;
    /// The policy text is not JSON.
    pub const JSON_STRUCTURE: u16 = 6;
    /// A ledger write failed (what a node gets for a duplicate id).
    pub const BLOCKCHAIN_OPERATION_FAILED: u16 = 30;
    /// The command has no file name.
    pub const MISSING_FILE_NAME: u16 = 64;
    /// The ledger could not be read.
    pub const FAILED_TO_PULL_BLOCKCHAIN: u16 = 68;
    /// The policy is not one root key with an object body.
    pub const WRONG_POLICY_STRUCTURE: u16 = 87;
    /// A delete of an id that is not stored.
    pub const DELETE_WRONG_KEY: u16 = 101;
    /// The requested file cannot be read.
    pub const FILE_READ_FAILED: u16 = 140;
}

/// Why bytes are not an AnyLog message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A block's counter is not the next one on the connection.
    #[error("block {got} arrived where block {expected} was due")]
    BadCounter {
        /// The counter the block should carry.
        expected: u32,
        /// The counter it carries.
        got: u32,
    },
    /// The lengths in a header point past the end of the block.
    #[error(
        "block {block}: command ({command}) + auth ({auth}) bytes exceed its payload ({payload} of at most {PAYLOAD_SIZE})"
    )]
    LengthsPastBlock {
        /// The block's counter.
        block: u32,
        /// Its command length.
        command: usize,
        /// Its auth length.
        auth: usize,
        /// Its payload length (command, auth and data).
        payload: usize,
    },
    /// The source address length is beyond the header's field.
    #[error("block {block}: source address length {len} exceeds {MAX_IP_LEN}")]
    SourceTooLong {
        /// The block's counter.
        block: u32,
        /// The length it gives.
        len: usize,
    },
    /// A later block carries a different command than the first.
    #[error("block {block} carries another command than block 1")]
    CommandChanged {
        /// The block's counter.
        block: u32,
    },
    /// The command or source address is not UTF-8.
    #[error("block {block}: the {what} is not UTF-8")]
    NotUtf8 {
        /// The block's counter.
        block: u32,
        /// `command` or `source address`.
        what: &'static str,
    },
    /// The message goes on beyond the largest one accepted.
    #[error("the message exceeds {max_blocks} blocks")]
    TooLarge {
        /// The most blocks accepted.
        max_blocks: u32,
    },
    /// The connection ended before the message did.
    #[error("the connection ended after {blocks} complete blocks and {partial} bytes of the next")]
    Truncated {
        /// Complete blocks received.
        blocks: u32,
        /// Bytes of the incomplete block.
        partial: usize,
    },
    /// Nothing arrived at all.
    #[error("the connection ended before any block")]
    Empty,
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(String),
}

/// Header fields of a message that do not come from its text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    /// Where answers go: the sender's TCP server address text (an IP, as EdgeLake sends it).
    pub source_ip: String,
    /// Where answers go: the sender's TCP server port.
    pub source_port: u32,
    /// Info type (see [`info_type`]).
    pub info_type: u8,
    /// Error code (0 for none; see [`error_code`]).
    pub error: u16,
    /// Generic flag (see [`generic_flag`]).
    pub generic_flag: u16,
    /// Job location and id, copied into answers.
    pub job: [u8; JOB_LEN],
}

/// One message: a command, the (unused) auth string and data, with its header fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The header fields of the first block.
    pub envelope: Envelope,
    /// The command text (the same in every block).
    pub command: String,
    /// The auth string of the first block (empty in open-source EdgeLake).
    pub auth: Vec<u8>,
    /// The data of every block, in order.
    pub data: Vec<u8>,
}

impl Message {
    /// A message with this command and data, envelope fields zero.
    pub fn new(command: impl Into<String>, data: impl Into<Vec<u8>>) -> Message {
        Message {
            command: command.into(),
            data: data.into(),
            ..Message::default()
        }
    }

    /// The message as blocks: see [`encode`].
    pub fn blocks(&self, file_rules: bool) -> Result<Blocks<'_>, String> {
        encode(&self.envelope, &self.command, &self.data, file_rules)
    }
}

/// A message as blocks, made one at a time as they are sent (a ledger file can be large).
#[derive(Debug, Clone)]
pub struct Blocks<'a> {
    envelope: &'a Envelope,
    command: &'a [u8],
    data: &'a [u8],
    capacity: usize,
    count: usize,
    next: usize,
}

/// Encodes a message of `command` and `data` as blocks. A command that does not fit one block
/// with room for data cannot be sent this way (nodes wrap it as a large message): it is refused.
///
/// Each block repeats the command and carries as much data as fits. With `file_rules` (a
/// `file write`), a data that exactly fills the last block is followed by an empty last block,
/// as the receivers of files expect.
pub fn encode<'a>(
    envelope: &'a Envelope,
    command: &'a str,
    data: &'a [u8],
    file_rules: bool,
) -> Result<Blocks<'a>, String> {
    let command = command.as_bytes();
    if command.len() >= PAYLOAD_SIZE {
        return Err(format!(
            "a command of {} bytes does not fit a block (at most {})",
            command.len(),
            PAYLOAD_SIZE - 1
        ));
    }
    let capacity = PAYLOAD_SIZE - command.len();
    let full = data.len() / capacity;
    let rest = data.len() % capacity;
    // A partial last block, or an empty one: for an empty message, or after a full last block
    // of a file.
    let count = if rest > 0 || full == 0 || file_rules {
        full + 1
    } else {
        full
    };
    Ok(Blocks {
        envelope,
        command,
        data,
        capacity,
        count,
        next: 0,
    })
}

impl Iterator for Blocks<'_> {
    type Item = [u8; BLOCK_SIZE];

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == self.count {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let start = (index * self.capacity).min(self.data.len());
        let end = (start + self.capacity).min(self.data.len());
        let data = &self.data[start..end];
        let command = self.command;
        let last = self.next == self.count;
        let mut block = [0u8; BLOCK_SIZE];
        self.envelope.write_to(&mut block, last);
        put_u32(&mut block, OFF_BLOCK_COUNTER, index as u32 + 1);
        block[OFF_LAST] = u8::from(last);
        put_u16(&mut block, OFF_COMMAND_LEN, command.len() as u16);
        put_u32(
            &mut block,
            OFF_DATA_LEN,
            (command.len() + data.len()) as u32,
        );
        block[HEADER_SIZE..HEADER_SIZE + command.len()].copy_from_slice(command);
        let at = HEADER_SIZE + command.len();
        block[at..at + data.len()].copy_from_slice(data);
        Some(block)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Blocks<'_> {}

impl Envelope {
    fn write_to(&self, block: &mut [u8; BLOCK_SIZE], last: bool) {
        block[OFF_INFO_TYPE] = self.info_type;
        // A receiver stops at a block with an error: only the last one may carry it.
        put_u16(block, OFF_ERROR, if last { self.error } else { 0 });
        block[OFF_JOB..OFF_JOB + JOB_LEN].copy_from_slice(&self.job);
        let ip = truncated(&self.source_ip, MAX_IP_LEN);
        block[OFF_IP_LEN] = ip.len() as u8;
        block[OFF_IP..OFF_IP + ip.len()].copy_from_slice(ip.as_bytes());
        put_u32(block, OFF_PORT, self.source_port);
        put_u16(block, OFF_GENERIC_FLAG, self.generic_flag);
    }
}

/// One decoded block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block<'a> {
    counter: u32,
    last: bool,
    envelope: Envelope,
    command: &'a [u8],
    auth: &'a [u8],
    data: &'a [u8],
}

fn decode(block: &[u8; BLOCK_SIZE]) -> Result<Block<'_>, WireError> {
    let counter = get_u32(block, OFF_BLOCK_COUNTER);
    let command_len = get_u16(block, OFF_COMMAND_LEN) as usize;
    let auth_len = get_u16(block, OFF_AUTH_LEN) as usize;
    let payload = get_u32(block, OFF_DATA_LEN) as usize;
    if payload > PAYLOAD_SIZE || command_len + auth_len > payload {
        return Err(WireError::LengthsPastBlock {
            block: counter,
            command: command_len,
            auth: auth_len,
            payload,
        });
    }
    let ip_len = block[OFF_IP_LEN] as usize;
    if ip_len > MAX_IP_LEN {
        return Err(WireError::SourceTooLong {
            block: counter,
            len: ip_len,
        });
    }
    let source_ip = std::str::from_utf8(&block[OFF_IP..OFF_IP + ip_len])
        .map_err(|_| WireError::NotUtf8 {
            block: counter,
            what: "source address",
        })?
        .to_string();
    let mut job = [0u8; JOB_LEN];
    job.copy_from_slice(&block[OFF_JOB..OFF_JOB + JOB_LEN]);
    let body = &block[HEADER_SIZE..HEADER_SIZE + payload];
    Ok(Block {
        counter,
        last: block[OFF_LAST] != 0,
        envelope: Envelope {
            source_ip,
            source_port: get_u32(block, OFF_PORT),
            info_type: block[OFF_INFO_TYPE],
            error: get_u16(block, OFF_ERROR),
            generic_flag: get_u16(block, OFF_GENERIC_FLAG),
            job,
        },
        command: &body[..command_len],
        auth: &body[command_len..command_len + auth_len],
        data: &body[command_len + auth_len..],
    })
}

/// Builds a message from its blocks as they arrive, checking each.
#[derive(Debug)]
pub struct Assembler {
    max_blocks: u32,
    received: u32,
    message: Message,
    done: bool,
}

impl Assembler {
    /// An assembler that refuses messages of more than `max_blocks` blocks.
    pub fn new(max_blocks: u32) -> Assembler {
        Assembler {
            max_blocks: max_blocks.max(1),
            received: 0,
            message: Message::default(),
            done: false,
        }
    }

    /// Adds the next block; returns whether it completed the message (its last flag is set, or
    /// it carries an error, after which receivers read no more).
    pub fn push(&mut self, block: &[u8; BLOCK_SIZE]) -> Result<bool, WireError> {
        assert!(!self.done, "a block pushed after the last one");
        let expected = self.received + 1;
        if expected > self.max_blocks {
            return Err(WireError::TooLarge {
                max_blocks: self.max_blocks,
            });
        }
        let block = decode(block)?;
        if block.counter != expected {
            return Err(WireError::BadCounter {
                expected,
                got: block.counter,
            });
        }
        if expected == 1 {
            self.message.command =
                String::from_utf8(block.command.to_vec()).map_err(|_| WireError::NotUtf8 {
                    block: expected,
                    what: "command",
                })?;
            self.message.auth = block.auth.to_vec();
            self.message.envelope = block.envelope.clone();
        } else if block.command != self.message.command.as_bytes() {
            return Err(WireError::CommandChanged { block: expected });
        }
        self.message.data.extend_from_slice(block.data);
        self.received = expected;
        self.done = block.last || block.envelope.error != 0;
        Ok(self.done)
    }

    /// The message, once [`Assembler::push`] said it is complete.
    pub fn finish(self) -> Message {
        assert!(self.done, "finish before the last block");
        self.message
    }
}

/// Reads one message: blocks until the last one. `block_timeout` bounds the wait for each
/// block, so a sender that stalls mid-message cannot hold the reader forever.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_blocks: u32,
    block_timeout: std::time::Duration,
) -> Result<Message, WireError> {
    let mut assembler = Assembler::new(max_blocks);
    let mut block = [0u8; BLOCK_SIZE];
    loop {
        let mut filled = 0;
        while filled < BLOCK_SIZE {
            let read = tokio::time::timeout(block_timeout, reader.read(&mut block[filled..]))
                .await
                .map_err(|_| {
                    WireError::Io(format!(
                        "no complete block within {block_timeout:?} ({filled} of {BLOCK_SIZE} bytes of block {})",
                        assembler.received + 1
                    ))
                })?
                .map_err(|e| WireError::Io(e.to_string()))?;
            if read == 0 {
                return Err(match (assembler.received, filled) {
                    (0, 0) => WireError::Empty,
                    (blocks, partial) => WireError::Truncated { blocks, partial },
                });
            }
            filled += read;
        }
        if assembler.push(&block)? {
            return Ok(assembler.finish());
        }
    }
}

/// Writes `message` as blocks (see [`encode`]), waiting at most `block_timeout` for each.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
    file_rules: bool,
    block_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let blocks = message
        .blocks(file_rules)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    write_blocks(writer, blocks, block_timeout).await
}

/// Writes `blocks`, waiting at most `block_timeout` for each, then flushes.
pub async fn write_blocks<W: AsyncWrite + Unpin>(
    writer: &mut W,
    blocks: Blocks<'_>,
    block_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the receiver took no block within {block_timeout:?}"),
        )
    };
    for block in blocks {
        tokio::time::timeout(block_timeout, writer.write_all(&block))
            .await
            .map_err(|_| timed_out())??;
    }
    tokio::time::timeout(block_timeout, writer.flush())
        .await
        .map_err(|_| timed_out())?
}

/// Whether the first bytes of a connection can be an AnyLog block rather than an HTTP/2 or TLS
/// client's: `None` while too few bytes have arrived to tell.
pub fn looks_like_anylog(first_bytes: &[u8]) -> Option<bool> {
    // A TLS record of a handshake: 0x16, then version 3.x.
    const TLS_HANDSHAKE: [u8; 2] = [0x16, 0x03];
    let n = first_bytes.len();
    if n < HTTP2_PREFACE.len() && HTTP2_PREFACE.starts_with(first_bytes) {
        return None;
    }
    if first_bytes.starts_with(HTTP2_PREFACE) {
        return Some(false);
    }
    if n < TLS_HANDSHAKE.len() && TLS_HANDSHAKE.starts_with(first_bytes) {
        return None;
    }
    if first_bytes.starts_with(&TLS_HANDSHAKE) {
        return Some(false);
    }
    if n == 0 {
        return None;
    }
    Some(true)
}

fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_u16(block: &mut [u8; BLOCK_SIZE], at: usize, value: u16) {
    block[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn put_u32(block: &mut [u8; BLOCK_SIZE], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn get_u16(block: &[u8; BLOCK_SIZE], at: usize) -> u16 {
    u16::from_be_bytes([block[at], block[at + 1]])
}

fn get_u32(block: &[u8; BLOCK_SIZE], at: usize) -> u32 {
    u32::from_be_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_message() -> Message {
        let mut m = Message::new(r#"blockchain push {"config": {"a": 1}}"#, Vec::new());
        m.envelope = Envelope {
            source_ip: "127.0.0.1".into(),
            source_port: 42150,
            info_type: info_type::COMMAND,
            error: 0,
            generic_flag: 0,
            job: [0, 3, 0, 0, 0, 9],
        };
        m
    }

    /// The layout of a node's one-block push, field by field.
    #[test]
    fn one_block_layout() {
        let m = push_message();
        let blocks: Vec<_> = m.blocks(false).unwrap().collect();
        assert_eq!(blocks.len(), 1);
        let b = &blocks[0];
        assert_eq!(&b[..30], &[0u8; 30]);
        assert_eq!(&b[30..34], &[0, 0, 0, 1], "block counter 1");
        assert_eq!(b[35], 1, "last");
        assert_eq!(b[36], 6, "info type");
        assert_eq!(&b[37..39], &[0, 0], "error");
        let len = m.command.len() as u8;
        assert_eq!(&b[39..41], &[0, len], "command length");
        assert_eq!(&b[41..43], &[0, 0], "auth length");
        assert_eq!(&b[43..47], &[0, 0, 0, len], "payload length");
        assert_eq!(&b[50..56], &[0, 3, 0, 0, 0, 9], "job");
        assert_eq!(b[72], 9);
        assert_eq!(&b[73..82], b"127.0.0.1");
        assert_eq!(&b[82..201], &[0u8; 119][..]);
        assert_eq!(&b[201..205], &42150u32.to_be_bytes());
        assert_eq!(&b[205..207], &[0, 0]);
        assert_eq!(&b[207..207 + m.command.len()], m.command.as_bytes());
        assert!(b[207 + m.command.len()..].iter().all(|&x| x == 0));
    }

    fn roundtrip(m: &Message, file_rules: bool) -> (usize, Message) {
        let blocks: Vec<_> = m.blocks(file_rules).unwrap().collect();
        let mut a = Assembler::new(1000);
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(a.push(b).unwrap(), i + 1 == blocks.len(), "block {i}");
        }
        (blocks.len(), a.finish())
    }

    #[test]
    fn data_is_split_and_reassembled() {
        let command = "file write /x/blockchain.master_id_1.new";
        let capacity = PAYLOAD_SIZE - command.len();
        for (size, file_blocks, plain_blocks) in [
            (0, 1, 1),
            (1, 1, 1),
            (capacity - 1, 1, 1),
            (capacity, 2, 1),
            (capacity + 1, 2, 2),
            (3 * capacity, 4, 3),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let m = Message::new(command, data.clone());
            let (n, back) = roundtrip(&m, true);
            assert_eq!(n, file_blocks, "file of {size} bytes");
            assert_eq!(back.data, data);
            assert_eq!(back.command, command);
            let (n, back) = roundtrip(&m, false);
            assert_eq!(n, plain_blocks, "message of {size} bytes");
            assert_eq!(back.data, data);
        }
    }

    #[test]
    fn a_command_that_fills_the_block_is_refused() {
        let m = Message::new("x".repeat(PAYLOAD_SIZE), Vec::new());
        assert!(m.blocks(false).is_err());
        let m = Message::new("x".repeat(PAYLOAD_SIZE - 1), Vec::new());
        assert_eq!(m.blocks(false).unwrap().len(), 1);
    }

    #[test]
    fn only_the_last_block_carries_the_error() {
        let mut m = Message::new("echo failed", vec![b'e'; 3000]);
        m.envelope.error = 30;
        let blocks: Vec<_> = m.blocks(false).unwrap().collect();
        assert_eq!(blocks.len(), 2);
        assert_eq!(get_u16(&blocks[0], OFF_ERROR), 0);
        assert_eq!(get_u16(&blocks[1], OFF_ERROR), 30);
        let (_, back) = roundtrip(&m, false);
        assert_eq!(back.data.len(), 3000);
        // An error ends the message early, as at a node.
        let mut a = Assembler::new(10);
        let mut first = blocks[0];
        put_u16(&mut first, OFF_ERROR, 5);
        assert!(a.push(&first).unwrap());
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let m = Message::new("event get_blockchain /x/b.new 0 0", vec![7; 5000]);
        let blocks: Vec<_> = m.blocks(false).unwrap().collect();
        let mut a = Assembler::new(10);
        assert_eq!(
            a.push(&blocks[1]),
            Err(WireError::BadCounter {
                expected: 1,
                got: 2
            })
        );
        let mut a = Assembler::new(10);
        a.push(&blocks[0]).unwrap();
        let mut changed = blocks[1];
        changed[HEADER_SIZE] = b'X';
        assert_eq!(
            a.push(&changed),
            Err(WireError::CommandChanged { block: 2 })
        );

        let mut past = blocks[0];
        put_u32(&mut past, OFF_DATA_LEN, PAYLOAD_SIZE as u32 + 1);
        assert!(matches!(
            Assembler::new(10).push(&past),
            Err(WireError::LengthsPastBlock { .. })
        ));
        let mut past = blocks[0];
        put_u16(&mut past, OFF_COMMAND_LEN, 2000);
        assert!(matches!(
            Assembler::new(10).push(&past),
            Err(WireError::LengthsPastBlock { .. })
        ));
        let mut ip = blocks[0];
        ip[OFF_IP_LEN] = 200;
        assert!(matches!(
            Assembler::new(10).push(&ip),
            Err(WireError::SourceTooLong { .. })
        ));
        let mut utf8 = blocks[0];
        utf8[HEADER_SIZE] = 0xff;
        assert!(matches!(
            Assembler::new(10).push(&utf8),
            Err(WireError::NotUtf8 { .. })
        ));
        let mut a = Assembler::new(2);
        a.push(&blocks[0]).unwrap();
        a.push(&blocks[1]).unwrap();
        assert_eq!(
            a.push(&blocks[2]),
            Err(WireError::TooLarge { max_blocks: 2 })
        );
    }

    #[tokio::test]
    async fn reads_and_writes_over_a_stream() {
        let m = push_message();
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent = m.clone();
        tokio::spawn(async move {
            write_message(&mut client, &sent, false, std::time::Duration::from_secs(5))
                .await
                .unwrap()
        });
        let got = read_message(&mut server, 4, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got, m);

        // Cut mid-block, and nothing at all.
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&[0u8; 100]).await.unwrap();
        drop(client);
        assert_eq!(
            read_message(&mut server, 4, std::time::Duration::from_secs(5)).await,
            Err(WireError::Truncated {
                blocks: 0,
                partial: 100
            })
        );
        let (client, mut server) = tokio::io::duplex(4096);
        drop(client);
        assert_eq!(
            read_message(&mut server, 4, std::time::Duration::from_secs(5)).await,
            Err(WireError::Empty)
        );
        // A sender that stalls.
        let (_client, mut server) = tokio::io::duplex(4096);
        let stalled = read_message(&mut server, 4, std::time::Duration::from_millis(50)).await;
        assert!(matches!(stalled, Err(WireError::Io(_))), "{stalled:?}");
    }

    #[test]
    fn tells_anylog_from_http2_and_tls() {
        assert_eq!(looks_like_anylog(b""), None);
        assert_eq!(looks_like_anylog(b"PRI * HTTP"), None);
        assert_eq!(looks_like_anylog(HTTP2_PREFACE), Some(false));
        assert_eq!(looks_like_anylog(&[0x16]), None);
        assert_eq!(looks_like_anylog(&[0x16, 0x03, 0x01]), Some(false));
        let block = push_message().blocks(false).unwrap().next().unwrap();
        assert_eq!(looks_like_anylog(&block[..1]), Some(true));
        assert_eq!(looks_like_anylog(&block), Some(true));
        assert_eq!(looks_like_anylog(b"PRX"), Some(true));
        assert_eq!(looks_like_anylog(b"GET / HTTP/1.1"), Some(true));
    }
}
