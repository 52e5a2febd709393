//! The serving core of a Ledger master: the `Ledger` core (complete, write, read, digest), the
//! single writer, the change feed and the subscriptions, and its two edges: gRPC (`service`,
//! with auth and limits, served by `serve`) and EdgeLake's AnyLog protocol (`anylog`).
//!
//! A policy travels `service` (gRPC edge) → `ledger` (completion, validation) → `writer` (group
//! commit) → `ledger_storage` (diesel: SQLite or PostgreSQL) → `feed` (fan-out) →
//! `subscription` (one stream per member). On a relay (a master whose source is another
//! master), `upstream` takes the writer's place: it follows the upstream's stream into the
//! storage and the feed, and forwards writes upstream with the caller's credentials. See
//! ARCHITECTURE.md.

#![warn(missing_docs)]

pub mod anylog;
pub mod auth;
pub mod chain;
pub mod chain_plan;
pub mod console;
pub mod error;
pub mod feed;
pub mod follower;
pub mod health;
pub mod ledger;
pub mod limits;
pub mod log_limit;
pub mod metrics;
pub mod serve;
pub mod service;
pub mod status;
pub mod storage_io;
pub mod subscribers;
pub mod subscription;
pub mod upstream;
pub mod writer;
