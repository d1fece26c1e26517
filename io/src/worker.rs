//! Worker threads: one monoio runtime per thread, pinned to a core.

use std::future::Future;
use std::io;
use std::thread::JoinHandle;

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};

use crate::driver::IoDriver;

/// io_uring submission queue size per worker: room for the timers, accepts and closes queued
/// between two trips to the kernel (sockets wait through the worker's epoll set, one entry).
const URING_ENTRIES: u32 = 4096;

/// Starts a worker thread named `keel-worker-<index>` running `make()`'s future to completion.
///
/// The future is built inside the thread, so it may hold `Rc`s and other core-local state. When
/// `core` is given the thread is pinned to it; pinning failures are logged, not fatal (a container
/// may restrict the cpuset).
pub fn spawn<F, Fut>(
    index: usize,
    core: Option<usize>,
    driver: IoDriver,
    make: F,
) -> io::Result<JoinHandle<io::Result<()>>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    std::thread::Builder::new().name(format!("keel-worker-{index}")).spawn(move || {
        if let Some(core) = core {
            if let Err(e) = monoio::utils::bind_to_cpu_set([core]) {
                tracing::warn!(worker = index, core, error = %e, "could not pin worker to its core");
            }
        }
        match driver {
            IoDriver::Uring => {
                let mut rt = RuntimeBuilder::<IoUringDriver>::new().with_entries(URING_ENTRIES).enable_timer().build()?;
                rt.block_on(serve(make))?;
            }
            IoDriver::Epoll => {
                let mut rt = RuntimeBuilder::<LegacyDriver>::new().enable_timer().build()?;
                rt.block_on(serve(make))?;
            }
        }
        Ok(())
    })
}

/// Runs the worker's future once its socket reactor is up.
async fn serve<F, Fut>(make: F) -> io::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let _scope = crate::reactor::enter()?;
    make().await;
    Ok(())
}

/// The cores this process may run on, in order; workers are pinned round-robin over them.
pub fn allowed_cores() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = Vec::new();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            for part in list.trim().split(',') {
                let mut ends = part
                    .split('-')
                    .filter_map(|x| x.trim().parse::<usize>().ok());
                if let Some(a) = ends.next() {
                    let b = ends.next().unwrap_or(a);
                    cores.extend(a..=b);
                }
            }
        }
    }
    if cores.is_empty() {
        cores = (0..n).collect();
    }
    cores
}
