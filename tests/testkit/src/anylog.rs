//! A test client speaking the node-to-master TCP protocol of EdgeLake / AnyLog nodes, so that
//! tests can use the `master` binary the way an unmodified EdgeLake node does.
//!
//! Written independently from the protocol facts (`EDGELAKE-PROTOCOL.md`), not from the
//! master's implementation: a message is sent on a new TCP connection as whole 2048-byte
//! blocks, each a 207-byte header (big-endian integers) followed by the command text, an auth
//! string (always empty) and data. Replies never come back on that connection: the master opens
//! a connection to the source address written in the request's header, which is the [`Node`]'s
//! own listener, and sends a message there.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::within;

/// Every block is exactly this long, padding included.
pub const BLOCK_SIZE: usize = 2048;
/// The header at the start of every block.
pub const HEADER_SIZE: usize = 207;
/// Room for the source IP text in the header.
pub const MAX_IP_LEN: usize = 128;
/// The longest command a node sends in one block (with no data); a longer one goes as a
/// `file write cmd.<ip>.<k>.lmsg` message whose data is the command.
pub const MAX_COMMAND_IN_BLOCK: usize = BLOCK_SIZE - HEADER_SIZE - 1;

/// Byte offsets of the header fields that matter here; the bytes not named are 0.
pub mod offset {
    /// u32: 1, 2, 3 … within one connection.
    pub const BLOCK_COUNTER: usize = 30;
    /// u8: 1 on the last block of a message.
    pub const LAST_BLOCK: usize = 35;
    /// u8: the kind of message (6 for a node's request, 2 or 4 for an echo reply).
    pub const INFO_TYPE: usize = 36;
    /// u16: an error code, 0 for none.
    pub const ERROR_CODE: usize = 37;
    /// u16: bytes of command text in the block.
    pub const COMMAND_LEN: usize = 39;
    /// u16: bytes of auth text in the block.
    pub const AUTH_LEN: usize = 41;
    /// u32: bytes in use after the header: command + auth + data.
    pub const DATA_LEN: usize = 43;
    /// u16: the job location, copied back into echo replies.
    pub const JOB_LOCATION: usize = 50;
    /// u32: the job id, copied back into echo replies.
    pub const JOB_ID: usize = 52;
    /// u16: the receivers count (a node writes 1; ignored by receivers).
    pub const RECEIVERS: usize = 56;
    /// u16: the partitions used (a node writes 1; ignored by receivers).
    pub const PARTITIONS_USED: usize = 60;
    /// u8: bytes of source IP text.
    pub const SOURCE_IP_LEN: usize = 72;
    /// The source IP text (up to 128 bytes): where replies go.
    pub const SOURCE_IP: usize = 73;
    /// u32: the source port: where replies go.
    pub const SOURCE_PORT: usize = 201;
    /// u16: 2 = a ledger file, 3 = a large message (read by `file write`).
    pub const GENERIC_FLAG: usize = 205;
}

/// Values of the generic flag.
pub mod generic_flag {
    /// Nothing special (a plain `file write`, requests).
    pub const NONE: u16 = 0;
    /// A `file write` carrying a ledger file (the answer to `event get_blockchain`).
    pub const LEDGER_FILE: u16 = 2;
    /// A `file write` whose data is a command too large for one block (`.lmsg`).
    pub const LARGE_MESSAGE: u16 = 3;
}

/// Values of the info type.
pub mod info_type {
    /// What a node's requests carry (`get_blockchain`, push, drop, file get …).
    pub const REQUEST: u8 = 6;
    /// An echo reporting a failed `blockchain …` command.
    pub const BLOCKCHAIN_ECHO: u8 = 2;
    /// Other echo replies.
    pub const ECHO: u8 = 4;
}

/// The error codes (EdgeLake's process status numbers) the tests look for.
pub mod error_code {
    /// A blockchain operation failed: a push of an id stored already.
    pub const BLOCKCHAIN_OPERATION_FAILED: u16 = 30;
    /// A drop of an id that is not stored.
    pub const WRONG_KEY_IN_DELETE: u16 = 101;
}

/// The header of one block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// 1, 2, 3 … within one connection.
    pub block_counter: u32,
    /// 1 on the last block.
    pub last_block: u8,
    /// See [`info_type`].
    pub info_type: u8,
    /// 0, or the code of an error being reported.
    pub error_code: u16,
    /// Bytes of command text in the block.
    pub command_len: u16,
    /// Bytes of auth text in the block.
    pub auth_len: u16,
    /// Bytes in use after the header: command + auth + data.
    pub data_len: u32,
    /// Copied back into echo replies.
    pub job_location: u16,
    /// Copied back into echo replies.
    pub job_id: u32,
    /// A node writes 1; receivers ignore it.
    pub receivers: u16,
    /// A node writes 1; receivers ignore it.
    pub partitions_used: u16,
    /// Where replies go: the sender's TCP server address (text, no port).
    pub source_ip: String,
    /// Where replies go: the sender's TCP server port.
    pub source_port: u32,
    /// See [`generic_flag`].
    pub generic_flag: u16,
}

fn put_u16(block: &mut [u8], at: usize, value: u16) {
    block[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn put_u32(block: &mut [u8], at: usize, value: u32) {
    block[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn get_u16(block: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([block[at], block[at + 1]])
}

fn get_u32(block: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

/// Overwrites the big-endian u16 at `at` of an encoded block (to make malformed blocks).
pub fn set_u16(block: &mut [u8], at: usize, value: u16) {
    put_u16(block, at, value);
}

/// Overwrites the big-endian u32 at `at` of an encoded block (to make malformed blocks).
pub fn set_u32(block: &mut [u8], at: usize, value: u32) {
    put_u32(block, at, value);
}

impl Header {
    /// Writes the fields into the first [`HEADER_SIZE`] bytes of `block`, as they are (the
    /// lengths included); every other header byte is left as it was.
    pub fn write(&self, block: &mut [u8]) {
        assert!(block.len() >= HEADER_SIZE);
        let ip = self.source_ip.as_bytes();
        assert!(ip.len() <= MAX_IP_LEN, "source IP longer than 128 bytes");
        put_u32(block, offset::BLOCK_COUNTER, self.block_counter);
        block[offset::LAST_BLOCK] = self.last_block;
        block[offset::INFO_TYPE] = self.info_type;
        put_u16(block, offset::ERROR_CODE, self.error_code);
        put_u16(block, offset::COMMAND_LEN, self.command_len);
        put_u16(block, offset::AUTH_LEN, self.auth_len);
        put_u32(block, offset::DATA_LEN, self.data_len);
        put_u16(block, offset::JOB_LOCATION, self.job_location);
        put_u32(block, offset::JOB_ID, self.job_id);
        put_u16(block, offset::RECEIVERS, self.receivers);
        put_u16(block, offset::PARTITIONS_USED, self.partitions_used);
        block[offset::SOURCE_IP_LEN] = ip.len() as u8;
        block[offset::SOURCE_IP..offset::SOURCE_IP + MAX_IP_LEN].fill(0);
        block[offset::SOURCE_IP..offset::SOURCE_IP + ip.len()].copy_from_slice(ip);
        put_u32(block, offset::SOURCE_PORT, self.source_port);
        put_u16(block, offset::GENERIC_FLAG, self.generic_flag);
    }

    /// Reads the fields from a block's first [`HEADER_SIZE`] bytes.
    pub fn read(block: &[u8]) -> Result<Header, String> {
        if block.len() < HEADER_SIZE {
            return Err(format!("a header of {} bytes", block.len()));
        }
        let ip_len = block[offset::SOURCE_IP_LEN] as usize;
        if ip_len > MAX_IP_LEN {
            return Err(format!("source IP length {ip_len} > {MAX_IP_LEN}"));
        }
        let ip = &block[offset::SOURCE_IP..offset::SOURCE_IP + ip_len];
        Ok(Header {
            block_counter: get_u32(block, offset::BLOCK_COUNTER),
            last_block: block[offset::LAST_BLOCK],
            info_type: block[offset::INFO_TYPE],
            error_code: get_u16(block, offset::ERROR_CODE),
            command_len: get_u16(block, offset::COMMAND_LEN),
            auth_len: get_u16(block, offset::AUTH_LEN),
            data_len: get_u32(block, offset::DATA_LEN),
            job_location: get_u16(block, offset::JOB_LOCATION),
            job_id: get_u32(block, offset::JOB_ID),
            receivers: get_u16(block, offset::RECEIVERS),
            partitions_used: get_u16(block, offset::PARTITIONS_USED),
            source_ip: String::from_utf8(ip.to_vec())
                .map_err(|_| format!("source IP is not UTF-8: {ip:?}"))?,
            source_port: get_u32(block, offset::SOURCE_PORT),
            generic_flag: get_u16(block, offset::GENERIC_FLAG),
        })
    }
}

/// One block taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Its header.
    pub header: Header,
    /// The command bytes.
    pub command: Vec<u8>,
    /// The auth bytes (empty in practice).
    pub auth: Vec<u8>,
    /// This block's share of the message's data.
    pub data: Vec<u8>,
}

/// Encodes one block: `header` with its length fields set from `command`, `auth` and `data`,
/// then those, zero-padded to [`BLOCK_SIZE`].
pub fn encode_block(header: &Header, command: &[u8], auth: &[u8], data: &[u8]) -> Vec<u8> {
    let used = command.len() + auth.len() + data.len();
    assert!(
        HEADER_SIZE + used <= BLOCK_SIZE,
        "{used} payload bytes do not fit in a block"
    );
    let mut block = vec![0; BLOCK_SIZE];
    let mut header = header.clone();
    header.command_len = command.len() as u16;
    header.auth_len = auth.len() as u16;
    header.data_len = used as u32;
    header.write(&mut block);
    let mut at = HEADER_SIZE;
    for part in [command, auth, data] {
        block[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    block
}

/// Takes one block apart, checking that the lengths stay within it.
pub fn decode_block(block: &[u8]) -> Result<Block, String> {
    if block.len() != BLOCK_SIZE {
        return Err(format!("a block of {} bytes", block.len()));
    }
    let header = Header::read(block)?;
    let (command_len, auth_len, data_len) = (
        header.command_len as usize,
        header.auth_len as usize,
        header.data_len as usize,
    );
    if HEADER_SIZE + data_len > BLOCK_SIZE {
        return Err(format!("data length {data_len} runs past the block"));
    }
    if command_len + auth_len > data_len {
        return Err(format!(
            "command length {command_len} + auth length {auth_len} > data length {data_len}"
        ));
    }
    let command_end = HEADER_SIZE + command_len;
    let auth_end = command_end + auth_len;
    Ok(Block {
        command: block[HEADER_SIZE..command_end].to_vec(),
        auth: block[command_end..auth_end].to_vec(),
        data: block[auth_end..HEADER_SIZE + data_len].to_vec(),
        header,
    })
}

/// How many data bytes a block with this command (and no auth) carries.
pub fn block_capacity(command_len: usize) -> usize {
    BLOCK_SIZE - HEADER_SIZE - command_len
}

/// Encodes a message as a sender does: every block repeats `command`, the data is split over
/// the blocks, each filled full; when the data exactly fills the last block an empty last block
/// follows; no data is one block. The counters, last flags and lengths are set; the other fields
/// come from `template`.
pub fn encode_message(template: &Header, command: &str, data: &[u8]) -> Vec<Vec<u8>> {
    let command = command.as_bytes();
    assert!(
        command.len() <= MAX_COMMAND_IN_BLOCK,
        "a command of {} bytes needs the .lmsg path",
        command.len()
    );
    let capacity = block_capacity(command.len());
    let mut chunks: Vec<&[u8]> = data.chunks(capacity).collect();
    if data.len().is_multiple_of(capacity) {
        // Nothing, or an exactly full last block: an empty last block follows.
        chunks.push(&[]);
    }
    let count = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut header = template.clone();
            header.block_counter = i as u32 + 1;
            header.last_block = u8::from(i + 1 == count);
            encode_block(&header, command, &[], chunk)
        })
        .collect()
}

/// The md5 hex of `bytes` (the digest a node sends in `get_blockchain`).
pub fn md5_hex(bytes: &[u8]) -> String {
    let mut digest = ledger_anylog::digest::LedgerDigest::new();
    digest.push_bytes(bytes);
    digest.hex()
}

/// A message received by a [`Node`]'s listener: one connection's blocks put together.
#[derive(Clone, PartialEq, Eq)]
pub struct Received {
    /// The command text (the same in every block).
    pub command: String,
    /// The header of every block, in order.
    pub headers: Vec<Header>,
    /// The data of all blocks, concatenated.
    pub data: Vec<u8>,
    /// How many data bytes each block carried.
    pub block_data: Vec<usize>,
    /// The TCP peer that sent it.
    pub peer: SocketAddr,
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = 300.min(self.data.len());
        f.debug_struct("Received")
            .field("command", &self.command)
            .field("first_header", &self.headers[0])
            .field("blocks", &self.headers.len())
            .field("data_len", &self.data.len())
            .field("data", &String::from_utf8_lossy(&self.data[..shown]))
            .field("peer", &self.peer)
            .finish()
    }
}

impl Received {
    /// The first block's header (the fields of an echo: error code, info type, job).
    pub fn header(&self) -> &Header {
        &self.headers[0]
    }

    /// How many blocks carried it.
    pub fn blocks(&self) -> usize {
        self.headers.len()
    }

    /// Whether it is an `echo` (a message to show, such as an error report).
    pub fn is_echo(&self) -> bool {
        self.command == "echo" || self.command.starts_with("echo ")
    }

    /// The data as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// For `file write NAME`, the name as a node reads it: up to the first space, tabs turned
    /// into spaces.
    pub fn file_write_name(&self) -> Option<String> {
        let rest = self.command.strip_prefix("file write ")?;
        let name = rest.split([' ', '\0']).next().unwrap_or_default();
        Some(name.replace('\t', " "))
    }

    /// Checks it is an echo whose command starts with `prefix`, with a non-zero error code (that
    /// one, when given), in blocks a node reads whole: the error code only on the last block.
    pub fn assert_echo(&self, prefix: &str, code: Option<u16>) {
        assert!(
            self.is_echo() && self.command.starts_with(prefix),
            "expected an echo starting with {prefix:?}, got {self:?}"
        );
        let last = self.headers.last().unwrap();
        assert_ne!(last.error_code, 0, "an echo reporting no error: {self:?}");
        if let Some(code) = code {
            assert_eq!(last.error_code, code, "the echo's error code: {self:?}");
        }
        // A node stops reading after a block with an error code.
        for header in &self.headers[..self.headers.len() - 1] {
            assert_eq!(header.error_code, 0, "an error code before the last block");
        }
    }

    /// Checks it is a `file write` blocked as a file transfer: every block but the last filled
    /// full, the last one not (empty when the data filled the one before, or for no data).
    pub fn assert_file_blocking(&self) {
        assert!(
            self.command.starts_with("file write "),
            "expected a file write, got {self:?}"
        );
        let capacity = block_capacity(self.command.len());
        let (last, full) = self.block_data.split_last().unwrap();
        for (i, len) in full.iter().enumerate() {
            assert_eq!(*len, capacity, "block {} is not full: {self:?}", i + 1);
        }
        assert!(
            *last < capacity,
            "the last block is full ({last} bytes): an empty last block must follow: {self:?}"
        );
    }
}

/// A file a [`Node`] received through `file write`.
#[derive(Clone, Debug)]
pub struct ReceivedFile {
    /// The file name, as the node would write it (tabs turned back into spaces).
    pub name: String,
    /// The content.
    pub bytes: Vec<u8>,
    /// The message that carried it.
    pub message: Received,
}

impl ReceivedFile {
    /// The md5 hex of the content.
    pub fn md5(&self) -> String {
        md5_hex(&self.bytes)
    }

    /// The content's lines, without their line breaks.
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8(self.bytes.clone())
            .expect("a UTF-8 ledger file")
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// How long a node waits for the next block of a message it receives.
const BLOCK_WAIT: Duration = Duration::from_secs(30);

/// Reads one message (blocks until the last flag) from a connection the master opened,
/// checking the framing; an `Err` describes what was wrong.
async fn read_message(mut stream: TcpStream, peer: SocketAddr) -> Result<Received, String> {
    let mut headers: Vec<Header> = Vec::new();
    let mut command: Option<Vec<u8>> = None;
    let mut data = Vec::new();
    let mut block_data = Vec::new();
    loop {
        let mut block = vec![0; BLOCK_SIZE];
        let mut got = 0;
        while got < BLOCK_SIZE {
            let n = match tokio::time::timeout(BLOCK_WAIT, stream.read(&mut block[got..])).await {
                Err(_) => {
                    return Err(format!(
                        "no complete block {} within {BLOCK_WAIT:?} ({got} bytes)",
                        headers.len() + 1
                    ));
                }
                Ok(Err(e)) => return Err(format!("reading block {}: {e}", headers.len() + 1)),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Err(if got == 0 {
                    format!(
                        "connection closed after {} blocks without a last block",
                        headers.len()
                    )
                } else {
                    format!(
                        "connection closed mid-block {} ({got} of {BLOCK_SIZE} bytes)",
                        headers.len() + 1
                    )
                });
            }
            got += n;
        }
        let decoded = decode_block(&block)?;
        let n = headers.len() as u32 + 1;
        if decoded.header.block_counter != n {
            return Err(format!(
                "block {n} has counter {}",
                decoded.header.block_counter
            ));
        }
        if !decoded.auth.is_empty() {
            return Err(format!("block {n} has an auth string"));
        }
        match &command {
            None => command = Some(decoded.command.clone()),
            Some(first) if *first != decoded.command => {
                return Err(format!(
                    "block {n} has another command: {:?}",
                    String::from_utf8_lossy(&decoded.command)
                ));
            }
            Some(_) => {}
        }
        data.extend_from_slice(&decoded.data);
        block_data.push(decoded.data.len());
        let last = decoded.header.last_block;
        headers.push(decoded.header);
        match last {
            0 => {}
            1 => break,
            other => return Err(format!("block {n} has last-block flag {other}")),
        }
    }
    let command = String::from_utf8(command.unwrap())
        .map_err(|e| format!("the command is not UTF-8: {e}"))?;
    Ok(Received {
        command,
        headers,
        data,
        block_data,
        peer,
    })
}

/// Options of one message a [`Node`] sends.
#[derive(Clone, Debug)]
pub struct SendOptions {
    /// The info type (a node's requests carry 6).
    pub info_type: u8,
    /// The error code (0 for a request).
    pub error_code: u16,
    /// The generic flag (read by `file write` only).
    pub generic_flag: u16,
    /// The job location, which echo replies copy back.
    pub job_location: u16,
    /// The job id, which echo replies copy back.
    pub job_id: u32,
    /// The source IP put in the header instead of the node's (replies go there).
    pub source_ip: Option<String>,
    /// The source port put in the header instead of the node's.
    pub source_port: Option<u32>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            info_type: info_type::REQUEST,
            error_code: 0,
            generic_flag: generic_flag::NONE,
            job_location: 0,
            job_id: 0,
            source_ip: None,
            source_port: None,
        }
    }
}

/// Connects to `addr` (within 30 s) and sends `bytes`, then half-closes. A write refused by the
/// peer is an `Err`: hostile senders expect that.
pub async fn send_bytes(addr: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
    let mut stream = within(30, "connecting to the master's AnyLog port", async {
        TcpStream::connect(addr).await
    })
    .await?;
    within(30, "sending to the master's AnyLog port", async {
        stream.write_all(bytes).await?;
        stream.shutdown().await
    })
    .await
}

/// An EdgeLake node as the master sees it: its own TCP server on an ephemeral loopback port
/// (written into every request header as the source IP and port), which collects whatever the
/// master sends back, and helpers sending the requests a node sends.
pub struct Node {
    addr: SocketAddr,
    inbox: mpsc::UnboundedReceiver<Result<Received, String>>,
    accept: tokio::task::JoinHandle<()>,
    lmsg_counter: u32,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Node {
    /// Starts the node's TCP server on `127.0.0.1:0`.
    pub async fn start() -> Node {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the node's listener");
        let addr = listener.local_addr().unwrap();
        let (sender, inbox) = mpsc::unbounded_channel();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _ = sender.send(read_message(stream, peer).await);
                });
            }
        });
        Node {
            addr,
            inbox,
            accept,
            lmsg_counter: 0,
        }
    }

    /// The address of the node's TCP server (the source address of its requests).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The header template of a request sent with `options`.
    pub fn request_header(&self, options: &SendOptions) -> Header {
        Header {
            info_type: options.info_type,
            error_code: options.error_code,
            job_location: options.job_location,
            job_id: options.job_id,
            receivers: 1,
            partitions_used: 1,
            source_ip: options
                .source_ip
                .clone()
                .unwrap_or_else(|| self.addr.ip().to_string()),
            source_port: options.source_port.unwrap_or(self.addr.port() as u32),
            generic_flag: options.generic_flag,
            ..Header::default()
        }
    }

    /// Sends one message exactly as given (no `.lmsg` wrapping) on a new connection; returns
    /// how many blocks it took.
    pub async fn send(
        &self,
        master: SocketAddr,
        command: &str,
        data: &[u8],
        options: &SendOptions,
    ) -> usize {
        let blocks = encode_message(&self.request_header(options), command, data);
        send_bytes(master, &blocks.concat())
            .await
            .unwrap_or_else(|e| panic!("sending {command:?} to {master}: {e}"));
        blocks.len()
    }

    /// Sends a command as a node does: in one block, or through the `.lmsg` path when it is
    /// too long for one; returns how many blocks it took.
    pub async fn send_command(&mut self, master: SocketAddr, command: &str) -> usize {
        if command.len() > MAX_COMMAND_IN_BLOCK {
            self.send_lmsg(master, command).await
        } else {
            self.send(master, command, &[], &SendOptions::default())
                .await
        }
    }

    /// Sends a command through the `.lmsg` path whatever its size: `file write
    /// cmd.<ip>.<k>.lmsg` with generic flag 3 and info type 0, the command as its data (`k`
    /// counts 1..100 per node). Returns how many blocks it took.
    pub async fn send_lmsg(&mut self, master: SocketAddr, command: &str) -> usize {
        self.lmsg_counter = self.lmsg_counter % 100 + 1;
        let name = format!(
            "file write cmd.{}.{}.lmsg",
            self.addr.ip(),
            self.lmsg_counter
        );
        let options = SendOptions {
            info_type: 0,
            generic_flag: generic_flag::LARGE_MESSAGE,
            ..SendOptions::default()
        };
        self.send(master, &name, command.as_bytes(), &options).await
    }

    /// Sends `event get_blockchain <dest> <md5> 0` (spaces in `dest` as tabs) and returns at
    /// once; the file, if any, arrives later.
    pub async fn request_blockchain(&self, master: SocketAddr, dest: &str, md5: &str) {
        let command = format!("event get_blockchain {} {md5} 0", dest.replace(' ', "\t"));
        self.send(master, &command, &[], &SendOptions::default())
            .await;
    }

    /// `get_blockchain`, then the ledger file the master sends back (within 60 s): checked to
    /// be a `file write` with generic flag 2, blocked as a file transfer.
    pub async fn get_blockchain(
        &mut self,
        master: SocketAddr,
        dest: &str,
        md5: &str,
    ) -> ReceivedFile {
        self.request_blockchain(master, dest, md5).await;
        let file = self.next_file(60).await;
        assert_eq!(
            file.message.header().generic_flag,
            generic_flag::LEDGER_FILE,
            "a ledger file has generic flag 2: {:?}",
            file.message
        );
        file
    }

    /// Sends `blockchain push <json>` (through `.lmsg` when too long for a block); returns how
    /// many blocks it took.
    pub async fn push(&mut self, master: SocketAddr, json: &str) -> usize {
        self.send_command(master, &format!("blockchain push {json}"))
            .await
    }

    /// Sends `blockchain push\tignore <json>`, with the tab real nodes send.
    pub async fn push_ignore(&mut self, master: SocketAddr, json: &str) -> usize {
        self.send_command(master, &format!("blockchain push\tignore {json}"))
            .await
    }

    /// Sends `blockchain drop policy where id = <id>`.
    pub async fn drop_policy(&mut self, master: SocketAddr, id: &str) -> usize {
        self.send_command(master, &format!("blockchain drop policy where id = {id}"))
            .await
    }

    /// Sends `file get !blockchain_file <path>` and returns the file sent back (within 60 s),
    /// checked to be a `file write` with generic flag 0 blocked as a file transfer.
    pub async fn file_get(&mut self, master: SocketAddr, path: &str) -> ReceivedFile {
        let command = format!("file get !blockchain_file {}", path.replace(' ', "\t"));
        self.send(master, &command, &[], &SendOptions::default())
            .await;
        let file = self.next_file(60).await;
        assert_eq!(
            file.message.header().generic_flag,
            generic_flag::NONE,
            "a file get answer has generic flag 0: {:?}",
            file.message
        );
        file
    }

    /// The next message the master sent, within `seconds`; a malformed one fails the test.
    pub async fn next_message(&mut self, seconds: u64) -> Received {
        let what = format!("a message back on the node's listener {}", self.addr);
        within(seconds, &what, self.inbox.recv())
            .await
            .expect("the node's listener runs")
            .unwrap_or_else(|e| panic!("a malformed message to the node: {e}"))
    }

    /// The next message, which must be a `file write` blocked as a file transfer.
    pub async fn next_file(&mut self, seconds: u64) -> ReceivedFile {
        let message = self.next_message(seconds).await;
        message.assert_file_blocking();
        ReceivedFile {
            name: message.file_write_name().unwrap(),
            bytes: message.data.clone(),
            message,
        }
    }

    /// The next message if one arrives within `wait`; a malformed one fails the test.
    pub async fn try_next_message(&mut self, wait: Duration) -> Option<Received> {
        match tokio::time::timeout(wait, self.inbox.recv()).await {
            Err(_) => None,
            Ok(message) => Some(
                message
                    .expect("the node's listener runs")
                    .unwrap_or_else(|e| panic!("a malformed message to the node: {e}")),
            ),
        }
    }

    /// Fails the test if anything (even a malformed message) arrives within `wait`.
    pub async fn expect_nothing_for(&mut self, wait: Duration) {
        if let Ok(message) = tokio::time::timeout(wait, self.inbox.recv()).await {
            panic!("expected nothing back, got {message:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example block of a node's push (fact sheet A.7), byte by byte.
    #[test]
    fn a_push_block_is_laid_out_as_a_node_sends_it() {
        let command = r#"blockchain push {"cluster": {"company": "Acme Inc", "name": "c1", "table": [{"dbms": "d", "name": "t", "status": "active"}], "id": "0d69b1e80a299a368ae9d22b146e980c", "date": "2026-12-01T22:52:57.606908Z", "status": "active", "ledger": "global"}}"#;
        assert_eq!(command.len(), 246);
        let template = Header {
            info_type: 6,
            receivers: 1,
            partitions_used: 1,
            source_ip: "127.0.0.1".into(),
            source_port: 42150,
            ..Header::default()
        };
        let blocks = encode_message(&template, command, &[]);
        assert_eq!(blocks.len(), 1);
        let block = &blocks[0];

        let mut expected = vec![0u8; BLOCK_SIZE];
        let mut put =
            |at: usize, bytes: &[u8]| expected[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x1e, &[0x00, 0x00, 0x00, 0x01]);
        put(0x22, &[0x00, 0x01, 0x06, 0x00, 0x00]);
        put(0x27, &[0x00, 0xf6, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf6]);
        put(0x2f, &[0; 9]);
        put(0x38, &[0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]);
        put(0x48, &[0x09]);
        put(0x49, b"127.0.0.1");
        put(0xc9, &[0x00, 0x00, 0xa4, 0xa6]);
        put(0xcd, &[0x00, 0x00]);
        put(0xcf, command.as_bytes());
        assert_eq!(block, &expected);

        let decoded = decode_block(block).unwrap();
        assert_eq!(decoded.command, command.as_bytes());
        assert!(decoded.auth.is_empty() && decoded.data.is_empty());
        assert_eq!(decoded.header.block_counter, 1);
        assert_eq!(decoded.header.last_block, 1);
        assert_eq!(decoded.header.command_len, 246);
        assert_eq!(decoded.header.data_len, 246);
        assert_eq!(decoded.header.source_ip, "127.0.0.1");
        assert_eq!(decoded.header.source_port, 42150);
    }

    fn split(command: &str, data_len: usize) -> Vec<Block> {
        let data: Vec<u8> = (0..data_len).map(|i| (i % 251) as u8).collect();
        let blocks: Vec<Block> = encode_message(&Header::default(), command, &data)
            .iter()
            .map(|b| decode_block(b).unwrap())
            .collect();
        for (i, block) in blocks.iter().enumerate() {
            assert_eq!(block.header.block_counter, i as u32 + 1);
            assert_eq!(block.header.last_block, u8::from(i + 1 == blocks.len()));
            assert_eq!(block.command, command.as_bytes());
        }
        let joined: Vec<u8> = blocks.iter().flat_map(|b| b.data.clone()).collect();
        assert_eq!(joined, data);
        blocks
    }

    #[test]
    fn data_is_split_over_full_blocks_with_an_empty_one_after_an_exact_fill() {
        let command = "file write /x/blockchain.master_id_1.new";
        let capacity = block_capacity(command.len());
        assert_eq!(capacity, 2048 - 207 - command.len());
        let lens = |blocks: Vec<Block>| blocks.iter().map(|b| b.data.len()).collect::<Vec<_>>();
        assert_eq!(lens(split(command, 0)), [0]);
        assert_eq!(lens(split(command, 1)), [1]);
        assert_eq!(lens(split(command, capacity - 1)), [capacity - 1]);
        assert_eq!(lens(split(command, capacity)), [capacity, 0]);
        assert_eq!(lens(split(command, capacity + 1)), [capacity, 1]);
        assert_eq!(lens(split(command, 2 * capacity)), [capacity, capacity, 0]);
        // The .lmsg example seen on the wire: a 2074-byte command in two blocks.
        let blocks = split("file write cmd.127.0.0.1.1.lmsg", 2074);
        let data_len: Vec<u32> = blocks.iter().map(|b| b.header.data_len).collect();
        assert_eq!(data_len, [1841, 295]);
    }

    #[test]
    fn lengths_past_the_block_are_refused() {
        let mut block = encode_message(&Header::default(), "get status", &[]).remove(0);
        set_u32(&mut block, offset::DATA_LEN, 2000);
        assert!(decode_block(&block).is_err());
        let mut block = encode_message(&Header::default(), "get status", &[]).remove(0);
        set_u16(&mut block, offset::COMMAND_LEN, 11);
        assert!(decode_block(&block).is_err());
        let mut block = encode_message(&Header::default(), "get status", &[]).remove(0);
        block[offset::SOURCE_IP_LEN] = 200;
        assert!(decode_block(&block).is_err());
    }

    #[test]
    fn the_file_name_is_read_as_a_node_reads_it() {
        let received = Received {
            command: "file write /tmp/my\tdir/blockchain.master_id_2.new".into(),
            headers: vec![Header::default()],
            data: Vec::new(),
            block_data: vec![0],
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(
            received.file_write_name().unwrap(),
            "/tmp/my dir/blockchain.master_id_2.new"
        );
        received.assert_file_blocking();
    }
}
