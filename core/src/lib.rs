//! Keel's proxy engine: workers with their listeners, the TCP proxy, counters and the admin API.
//!
//! It reads a compiled `keel_config::Snapshot`, uses `keel_io` for sockets and runtimes and
//! `keel_lb` for picks. Protocol codecs (HTTP/1, HTTP/2), routing and filters will live here too.

pub mod admin;
pub mod fleet;
pub mod generation;
pub mod handover;
pub mod http;
pub mod idle;
pub mod sd_notify;
pub mod server;
pub mod stats;
pub mod tcp_proxy;
pub mod worker;

pub use server::{run, RunOptions, StartError};
