//! The Ledger contract shared by the master, the member and every client: the gRPC API
//! generated from `proto/ledger/v1/ledger.proto`. The AnyLog policy format both sides agree on
//! is `ledger-anylog` (`proto/anylog`).

pub mod errors;
pub mod server;

/// The generated `ledger.v1` messages and client (and `ErrorReason`, which [`errors`] calls
/// `Reason`); the server is [`server`].
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ledger.v1");
}

/// The encoded `FileDescriptorSet` of `ledger.v1`, served by server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ledger_descriptor");
