//! Choosing the io driver: io_uring where the kernel and sandbox allow it, epoll otherwise.
//!
//! Docker's and containerd's default seccomp profiles refuse io_uring, and monoio's fusion driver
//! would then fall back silently; we decide explicitly at start, log it, and export it as a metric.

use std::fmt;
use std::str::FromStr;

/// What the operator asked for (`--io-driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DriverChoice {
    #[default]
    Auto,
    Uring,
    Epoll,
}

impl FromStr for DriverChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DriverChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(DriverChoice::Uring),
            "epoll" | "legacy" => Ok(DriverChoice::Epoll),
            _ => Err(format!(
                "unknown io driver `{s}`: expected auto, uring or epoll"
            )),
        }
    }
}

/// The driver actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    Uring,
    Epoll,
}

impl IoDriver {
    /// The name shown in logs and in the `keel_io_driver` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            IoDriver::Uring => "io_uring",
            IoDriver::Epoll => "epoll",
        }
    }
}

impl fmt::Display for IoDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether io_uring can be used here: the kernel has it and seccomp and memlock limits allow a ring.
pub fn uring_available() -> bool {
    std::env::var_os("MONOIO_FORCE_LEGACY_DRIVER").is_none() && monoio::utils::detect_uring()
}

/// Turns the operator's choice into a driver, refusing `uring` where it cannot work.
pub fn resolve(choice: DriverChoice) -> Result<IoDriver, String> {
    match choice {
        DriverChoice::Auto if uring_available() => Ok(IoDriver::Uring),
        DriverChoice::Auto | DriverChoice::Epoll => Ok(IoDriver::Epoll),
        DriverChoice::Uring if uring_available() => Ok(IoDriver::Uring),
        DriverChoice::Uring => Err("io_uring is not available here (kernel, seccomp profile or RLIMIT_MEMLOCK refuses it); use --io-driver epoll or auto".into()),
    }
}
