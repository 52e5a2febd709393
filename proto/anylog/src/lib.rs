//! The AnyLog policy format that the master, the member and EdgeLake nodes must agree on byte
//! for byte: completion of a policy and its id ([`policy`]) and its `date` ([`date`]), Python's
//! `str()` and `json.dumps` that define them ([`pyformat`]), the `blockchain.json` ledger's
//! digest ([`digest`]), and AnyLog's TCP message format, which EdgeLake nodes speak to their
//! master ([`wire`]).
//!
//! Architecture invariant: nothing here knows gRPC (no tonic, no prost).

pub mod date;
pub mod digest;
pub mod policy;
pub mod pyformat;
pub mod wire;
