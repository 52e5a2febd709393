//! The Ledger master: stores AnyLog policies with diesel and streams every change over gRPC.
//!
//! A policy travels `service` (gRPC edge) → `ledger` (completion, validation) → `writer` (group
//! commit) → `storage` (diesel: SQLite or PostgreSQL) → `feed` (fan-out) → `subscription` (one
//! stream per member). See ARCHITECTURE.md.

#![warn(missing_docs)]

pub mod anylog;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod feed;
pub mod follower;
pub mod health;
pub mod ledger;
pub mod limits;
pub mod log_limit;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod service;
pub mod storage;
pub mod subscription;
pub mod writer;
