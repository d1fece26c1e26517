//! Per-worker pooled buffers. A connection takes one only while bytes are moving; an idle
//! connection holds none.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Size of one forwarding buffer. Large enough that a bulk transfer costs few syscalls per MiB.
pub const BUFFER_SIZE: usize = 256 * 1024;
/// Size of an HTTP buffer: a whole request head (60 KiB by default) fits.
pub const HTTP_BUFFER_SIZE: usize = 64 * 1024;

/// Buffers kept for reuse per worker and size; beyond this a returned buffer is freed.
const POOL_MAX: usize = 512;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    static HTTP_POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this thread's pool, returned to it on drop.
///
/// A plain `Box<[u8]>` (16 bytes, never null), so `Option<Buffer>` costs no more: it sits in the
/// state of every connection.
pub struct Buffer {
    data: Box<[u8]>,
}

impl Buffer {
    /// Takes a forwarding buffer from the pool, allocating if it is empty.
    pub fn take() -> Buffer {
        let data = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        Buffer { data }
    }

    /// Takes an HTTP buffer (heads and body chunks) from its pool.
    pub fn take_http() -> Buffer {
        let data = HTTP_POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; HTTP_BUFFER_SIZE].into_boxed_slice());
        Buffer { data }
    }

    /// Forwarding buffers currently waiting in this thread's pool.
    pub fn pooled() -> usize {
        POOL.with(|p| p.borrow().len())
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // An empty boxed slice does not allocate: taking the data leaves nothing to free.
        let data = std::mem::take(&mut self.data);
        if !data.is_empty() {
            let pool = if data.len() == HTTP_BUFFER_SIZE {
                &HTTP_POOL
            } else {
                &POOL
            };
            pool.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(data);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused() {
        let before = Buffer::pooled();
        let b = Buffer::take();
        assert_eq!(b.len(), BUFFER_SIZE);
        drop(b);
        assert_eq!(Buffer::pooled(), before.max(1));
        let _b = Buffer::take();
        assert_eq!(Buffer::pooled(), before.max(1) - 1);
    }
}
