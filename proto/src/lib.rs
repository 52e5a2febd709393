//! The Ledger contract shared by the master, the member and every client: the gRPC API
//! generated from `proto/ledger/v1/ledger.proto`, and the AnyLog policy format (completion,
//! ids, the `blockchain.json` line format) that both sides must agree on byte for byte, and
//! AnyLog's TCP message format, which EdgeLake nodes speak to their master.

pub mod anylog;
pub mod policy;
pub mod pyformat;
pub mod server;

/// The generated `ledger.v1` messages and client; the server is [`server`].
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ledger.v1");
}

/// The encoded `FileDescriptorSet` of `ledger.v1`, served by server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ledger_descriptor");
