//! [`WriteLog`]: a [`BlockDevice`] wrapper that remembers which byte ranges
//! a client changed.
//!
//! Post-copy migration verifies the destination against the source at the
//! end, but only where the guest did not write: a range the guest changed on
//! the destination legitimately differs. Putting the log on the path the
//! guest uses (the NBD export's device), not in the image, keeps the stream
//! job's and copy-on-read's own writes out of it. Writes, write-zeroes and
//! discards are recorded when they are *issued*, before they complete, so a
//! request that fails half-way still counts as changed (a range it may have
//! touched is never verified against the source). Ranges are kept merged in
//! a sorted map; memory is one entry per disjoint written run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use crate::Result;
use crate::device::{BlockDevice, DeviceInfo, Extent, WriteFlags};

/// Sorted, merged, half-open byte ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end; disjoint and not touching.
    runs: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[start, end)`, merging with runs it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // A run starting at or before `end` may touch or overlap.
        let touching: Vec<(u64, u64)> = self
            .runs
            .range(..=end)
            .rev()
            .take_while(|&(_, &re)| re >= start)
            .map(|(&rs, &re)| (rs, re))
            .collect();
        for (rs, re) in touching {
            self.runs.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        self.runs.insert(s, e);
    }

    /// The runs, in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &e)| (s, e))
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    /// The parts of `[start, end)` *not* covered, in order.
    pub fn gaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = start;
        // The run that may cover `start` begins at or before it.
        let first = self
            .runs
            .range(..=start)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(start);
        for (&rs, &re) in self.runs.range(first..end) {
            if re <= pos {
                continue;
            }
            if rs > pos {
                out.push((pos, rs.min(end)));
            }
            pos = pos.max(re);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }
}

/// A device that records the ranges written through it.
#[derive(Debug)]
pub struct WriteLog {
    inner: Arc<dyn BlockDevice>,
    written: Mutex<RangeSet>,
}

impl WriteLog {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        WriteLog {
            inner,
            written: Mutex::new(RangeSet::default()),
        }
    }

    /// The ranges written (or zeroed, or discarded) so far.
    pub fn written(&self) -> RangeSet {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record(&self, offset: u64, len: u64) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(offset, offset.saturating_add(len));
    }
}

#[async_trait]
impl BlockDevice for WriteLog {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.record(offset, data.len() as u64);
        self.inner.write(offset, data, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.record(offset, len);
        self.inner.write_zeroes(offset, len, may_unmap).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.record(offset, len);
        self.inner.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }

    fn backing_device(&self) -> Option<Arc<dyn BlockDevice>> {
        self.inner.backing_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges_overlapping_and_touching_runs() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 25); // touches the first
        assert_eq!(r.runs().collect::<Vec<_>>(), vec![(10, 25), (30, 40)]);
        r.insert(5, 35); // swallows both
        assert_eq!(r.runs().collect::<Vec<_>>(), vec![(5, 40)]);
        r.insert(0, 0);
        assert_eq!(r.bytes(), 35);
    }

    #[test]
    fn gaps_are_the_uncovered_parts() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(r.gaps(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(r.gaps(15, 35), vec![(20, 30)]);
        assert_eq!(r.gaps(12, 18), Vec::<(u64, u64)>::new());
        assert_eq!(r.gaps(40, 45), vec![(40, 45)]);
        assert_eq!(RangeSet::default().gaps(3, 9), vec![(3, 9)]);
    }

    #[test]
    fn gaps_match_a_byte_model() {
        let mut rng = crate::testing::TestRng::new(7);
        for _ in 0..200 {
            let mut r = RangeSet::default();
            let mut model = [false; 256];
            for _ in 0..(rng.next_u64() % 8) {
                let s = rng.next_u64() % 256;
                let e = (s + rng.next_u64() % 64).min(256);
                r.insert(s, e);
                model[s as usize..e as usize].fill(true);
            }
            let (a, b) = (rng.next_u64() % 256, rng.next_u64() % 256);
            let (a, b) = (a.min(b), a.max(b));
            let mut want = vec![false; 256];
            for (s, e) in r.gaps(a, b) {
                want[s as usize..e as usize].fill(true);
            }
            for i in 0..256 {
                let gap = (a..b).contains(&(i as u64)) && !model[i];
                assert_eq!(want[i], gap, "byte {i}");
            }
        }
    }
}
