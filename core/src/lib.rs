//! Keel's proxy engine: workers with their listeners, the TCP and HTTP/1.1 proxies, counters, the
//! admin API, and the process lifecycle (reload, drain, binary upgrade, systemd readiness).
//!
//! It reads compiled `keel_config::Snapshot`s — each worker runs one as a [`generation`], and a
//! reload swaps a new one in on every worker through the [`fleet`] — uses `keel_io` for sockets and
//! runtimes and `keel_lb` for picks.

#![recursion_limit = "256"]

pub mod access_log;
pub mod admin;
pub mod breaker;
pub mod capture;
pub mod config;
pub mod dns;
pub mod downstream_tls;
pub mod fast_hash;
pub mod fleet;
pub mod generation;
pub mod handover;
pub mod health_check;
pub mod http;
pub mod idle;
pub mod istio_metrics;
pub mod jwks;
pub mod rate_limit;
pub mod resolve;
pub mod sd_notify;
pub mod security;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
pub mod trace;
pub mod upstream;
pub mod worker;

pub use server::{run, RunOptions, StartError};
