//! Runtime glue for Keel's thread-per-core design: which io driver runs, worker threads pinned to
//! cores, SO_REUSEPORT listening sockets, pooled buffers, moving bytes between sockets, and passing
//! sockets to another process (SCM_RIGHTS) for a binary upgrade.
//!
//! This crate knows sockets and runtimes but nothing of config, routing or balancing; the proxy
//! engine (`keel-core`) composes these pieces.

pub mod buffer;
pub mod capture;
pub mod connect;
pub mod driver;
pub mod forward;
pub mod listener;
pub mod reactor;
pub mod splice;
pub mod stream;
pub mod time;
pub mod unix_seqpacket;
pub mod worker;

pub use buffer::{Buffer, BUFFER_SIZE, HTTP_BUFFER_SIZE};
pub use connect::{connect, ConnectError, KeepaliveOpts};
pub use driver::{DriverChoice, IoDriver};
pub use forward::Forwarding;
pub use stream::Stream;
