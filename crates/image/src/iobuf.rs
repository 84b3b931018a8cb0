//! Reusable I/O buffers whose window starts 4 KiB aligned.
//!
//! Copies (convert, stream, copy-on-read) move megabytes at a time. A fresh
//! zeroed `Vec` per copy costs a memset and page faults, and its unaligned
//! start makes every O_DIRECT write go through a bounce copy. An [`IoBuf`]
//! is a `Vec` with an aligned window, taken from a process-wide pool and
//! given back when dropped, so both costs are paid once. No `unsafe`: the
//! alignment is an offset into an ordinary `Vec`.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Alignment of the window (enough for O_DIRECT on 512 B and 4 KiB sectors).
pub const IO_ALIGN: usize = 4096;
/// Size of pooled buffers; larger requests get a buffer of their own.
pub const POOL_BUF_SIZE: usize = 4 << 20;
/// Buffers kept for reuse at most (bounds the pool at 128 MiB).
const POOL_MAX: usize = 32;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of `len` bytes. One from [`IoBuf::take`] starts at a 4 KiB
/// boundary and its content is unspecified (but initialised): fill every
/// byte you read. One made from a `Vec` keeps that `Vec`, as it is.
#[derive(Debug)]
pub struct IoBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// A buffer of `len` bytes, from the pool when it fits.
    pub fn take(len: usize) -> IoBuf {
        let mem = if len <= POOL_BUF_SIZE {
            POOL.lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_else(|| vec![0u8; POOL_BUF_SIZE + IO_ALIGN])
        } else {
            vec![0u8; len + IO_ALIGN]
        };
        let start = mem.as_ptr().align_offset(IO_ALIGN);
        IoBuf { mem, start, len }
    }
}

impl From<Vec<u8>> for IoBuf {
    /// Wraps `v` without copying (and without any alignment promise).
    fn from(v: Vec<u8>) -> IoBuf {
        let len = v.len();
        IoBuf {
            mem: v,
            start: 0,
            len,
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.mem.len() == POOL_BUF_SIZE + IO_ALIGN {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(std::mem::take(&mut self.mem));
            }
        }
    }
}

/// Whether every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only splits.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// The runs `(start, end)` of `buf` made of `unit`-sized blocks (the last
/// may be shorter) that are not all zeros, neighbours merged: what a copy
/// must write when zeros may stay holes.
pub fn nonzero_runs(buf: &[u8], unit: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(unit).enumerate() {
        if is_zero(block) {
            continue;
        }
        let (s, e) = (i * unit, i * unit + block.len());
        match runs.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => runs.push((s, e)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_skipped_and_runs_merged() {
        let mut b = vec![0u8; 5 * 4096 + 100];
        b[1] = 1;
        b[4096 + 7] = 1;
        b[3 * 4096] = 1;
        b[5 * 4096 + 99] = 1;
        assert_eq!(
            nonzero_runs(&b, 4096),
            vec![(0, 8192), (12288, 16384), (20480, 20580)]
        );
        assert!(nonzero_runs(&[0u8; 8192], 4096).is_empty());
        assert!(is_zero(&[0u8; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn windows_are_aligned_and_sized() {
        for len in [1, 4096, 1 << 20, POOL_BUF_SIZE, POOL_BUF_SIZE + 1] {
            let b = IoBuf::take(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        }
    }

    #[test]
    fn a_wrapped_vec_keeps_its_bytes() {
        let b = IoBuf::from(vec![7u8; 1000]);
        assert_eq!(&b[..], &[7u8; 1000][..]);
    }

    #[test]
    fn dropped_buffers_are_reused() {
        let first = IoBuf::take(1 << 20);
        let addr = first.mem.as_ptr() as usize;
        drop(first);
        // Other tests share the pool; one of the next few takes gets it back.
        let again: Vec<IoBuf> = (0..POOL_MAX).map(|_| IoBuf::take(4096)).collect();
        assert!(again.iter().any(|b| b.mem.as_ptr() as usize == addr));
    }
}
