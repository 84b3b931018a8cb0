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
/// Size of the large pooled buffers; larger requests get a buffer of their
/// own.
pub const POOL_BUF_SIZE: usize = 4 << 20;
/// Size of the small pooled buffers, for requests up to this long: a
/// guest's 4 KiB read or a subcluster fill must not take a 4 MiB buffer.
/// (They did: under 64 NBD clients of a qcow2 image with subclusters, more
/// than 32 at once emptied the pool, each new 4 MiB buffer was zeroed, and
/// once glibc had raised its mmap threshold past them they came from the
/// heap and stayed there: 450-830 MiB of RSS and a quarter fewer IOPS.)
const SMALL_BUF_SIZE: usize = 256 << 10;

/// A pool of buffers of one size.
struct Class {
    size: usize,
    /// Buffers kept for reuse at most.
    max: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

/// The pools: 64 x 256 KiB (16 MiB) and 32 x 4 MiB (128 MiB) at most.
static CLASSES: [Class; 2] = [
    Class {
        size: SMALL_BUF_SIZE,
        max: 64,
        free: Mutex::new(Vec::new()),
    },
    Class {
        size: POOL_BUF_SIZE,
        max: 32,
        free: Mutex::new(Vec::new()),
    },
];

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
        let mem = match CLASSES.iter().find(|c| len <= c.size) {
            Some(c) => c
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_else(|| vec![0u8; c.size + IO_ALIGN]),
            None => vec![0u8; len + IO_ALIGN],
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
        let n = self.mem.len();
        if let Some(c) = CLASSES.iter().find(|c| n == c.size + IO_ALIGN) {
            let mut free = c.free.lock().unwrap_or_else(|e| e.into_inner());
            if free.len() < c.max {
                free.push(std::mem::take(&mut self.mem));
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
    fn dropped_buffers_are_reused_in_their_size_class() {
        for (len, class) in [(4096, 0), (SMALL_BUF_SIZE, 0), (1 << 20, 1)] {
            let first = IoBuf::take(len);
            assert_eq!(first.mem.len(), CLASSES[class].size + IO_ALIGN, "{len}");
            let addr = first.mem.as_ptr() as usize;
            drop(first);
            // Other tests share the pools; one of the next takes of the
            // class gets it back.
            let again: Vec<IoBuf> = (0..CLASSES[class].max).map(|_| IoBuf::take(len)).collect();
            assert!(
                again.iter().any(|b| b.mem.as_ptr() as usize == addr),
                "{len}"
            );
        }
    }

    #[test]
    fn a_small_request_does_not_take_a_large_buffer() {
        let b = IoBuf::take(SMALL_BUF_SIZE + 1);
        assert_eq!(b.mem.len(), POOL_BUF_SIZE + IO_ALIGN);
        let b = IoBuf::take(65536);
        assert_eq!(b.mem.len(), SMALL_BUF_SIZE + IO_ALIGN);
        let b = IoBuf::take(POOL_BUF_SIZE + 1);
        assert_eq!(b.mem.len(), POOL_BUF_SIZE + 1 + IO_ALIGN);
    }
}
