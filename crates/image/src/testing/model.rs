//! A flat model of a device's content that knows which values each byte may
//! legitimately read back.
//!
//! A byte has one definite value, plus two kinds of tolerated alternatives:
//! zero, after a discard (a discarded range reads as zeros or keeps its old
//! content, never older backing data), and *maybe* values, from operations
//! that may or may not have reached the medium before a crash (a write that
//! was not followed by a completed flush). A definite write or write-zeroes
//! over a byte removes both. The check is per byte: it accepts any mix of
//! old and new within an uncertain range, which is what torn writes produce.

use std::fmt::Write as _;

/// What an uncertain operation may have left in its range.
#[derive(Clone, Debug)]
enum Maybe {
    Data(Vec<u8>),
    Zero,
}

#[derive(Clone, Debug)]
struct Alt {
    start: u64,
    end: u64,
    /// Offset of `Maybe::Data`'s first byte (it may have been trimmed).
    data_at: u64,
    what: Maybe,
}

impl Alt {
    fn value(&self, at: u64) -> u8 {
        match &self.what {
            Maybe::Data(d) => d[(at - self.data_at) as usize],
            Maybe::Zero => 0,
        }
    }
}

/// The content model. Offsets are device offsets.
#[derive(Clone, Debug)]
pub struct ContentModel {
    vals: Vec<u8>,
    zero_ok: Vec<bool>,
    alts: Vec<Alt>,
}

impl ContentModel {
    /// A device that reads as `initial` (for an overlay: the backing content,
    /// zero-extended to the overlay's size).
    pub fn new(initial: Vec<u8>) -> Self {
        let n = initial.len();
        ContentModel {
            vals: initial,
            zero_ok: vec![false; n],
            alts: Vec::new(),
        }
    }

    pub fn size(&self) -> u64 {
        self.vals.len() as u64
    }

    /// The definite values (what a device reads when no alternative was
    /// taken).
    pub fn values(&self) -> &[u8] {
        &self.vals
    }

    /// Whether any byte has an alternative.
    pub fn is_exact(&self) -> bool {
        self.alts.is_empty() && !self.zero_ok.iter().any(|&z| z)
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).expect("range overflows");
        assert!(
            end <= self.size(),
            "model range {offset}+{len} past {}",
            self.size()
        );
        offset as usize..end as usize
    }

    /// Removes every maybe-alternative inside `[offset, offset + len)`.
    fn clear_alts(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut out = Vec::with_capacity(self.alts.len());
        for a in self.alts.drain(..) {
            if a.end <= offset || a.start >= end {
                out.push(a);
                continue;
            }
            if a.start < offset {
                out.push(Alt {
                    end: offset,
                    ..a.clone()
                });
            }
            if a.end > end {
                out.push(Alt { start: end, ..a });
            }
        }
        self.alts = out;
    }

    /// A definite write.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let r = self.range(offset, data.len() as u64);
        self.vals[r.clone()].copy_from_slice(data);
        self.zero_ok[r].fill(false);
        self.clear_alts(offset, data.len() as u64);
    }

    /// A definite write-zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) {
        let r = self.range(offset, len);
        self.vals[r.clone()].fill(0);
        self.zero_ok[r].fill(false);
        self.clear_alts(offset, len);
    }

    /// A definite discard: each byte reads as before or as zero.
    pub fn discard(&mut self, offset: u64, len: u64) {
        let r = self.range(offset, len);
        self.zero_ok[r].fill(true);
    }

    /// A write that may or may not have happened.
    pub fn maybe_write(&mut self, offset: u64, data: &[u8]) {
        self.range(offset, data.len() as u64);
        self.alts.push(Alt {
            start: offset,
            end: offset + data.len() as u64,
            data_at: offset,
            what: Maybe::Data(data.to_vec()),
        });
    }

    /// A write-zeroes or discard that may or may not have happened.
    pub fn maybe_zero(&mut self, offset: u64, len: u64) {
        self.range(offset, len);
        self.alts.push(Alt {
            start: offset,
            end: offset + len,
            data_at: offset,
            what: Maybe::Zero,
        });
    }

    fn allowed(&self, at: u64, v: u8) -> bool {
        let i = at as usize;
        self.vals[i] == v
            || (v == 0 && self.zero_ok[i])
            || self
                .alts
                .iter()
                .any(|a| a.start <= at && at < a.end && a.value(at) == v)
    }

    /// Checks what a device read at `offset`. The error names the first bad
    /// byte, what was allowed, and how many bytes are wrong.
    pub fn check(&self, offset: u64, actual: &[u8]) -> Result<(), String> {
        let r = self.range(offset, actual.len() as u64);
        let mut bad = 0u64;
        let mut first = None;
        for (i, &v) in actual.iter().enumerate() {
            let at = offset + i as u64;
            // Fast path: the definite value.
            if self.vals[r.start + i] == v || self.allowed(at, v) {
                continue;
            }
            bad += 1;
            first.get_or_insert(at);
        }
        let Some(at) = first else { return Ok(()) };
        let mut msg = format!(
            "{bad} wrong bytes in [{offset}, {}); first at {at}: read {:#04x}, expected {:#04x}",
            offset + actual.len() as u64,
            actual[(at - offset) as usize],
            self.vals[at as usize]
        );
        if self.zero_ok[at as usize] {
            msg.push_str(" or 0");
        }
        for a in self.alts.iter().filter(|a| a.start <= at && at < a.end) {
            let _ = write!(
                msg,
                " or {:#04x} (maybe from [{}, {}))",
                a.value(at),
                a.start,
                a.end
            );
        }
        Err(msg)
    }

    /// After a successful [`check`](Self::check): makes what was read the
    /// definite content, so later checks (and a comparison with a raw copy
    /// of [`values`](Self::values)) are exact.
    pub fn resolve(&mut self, offset: u64, actual: &[u8]) {
        self.check(offset, actual)
            .expect("resolve after a failed check");
        let r = self.range(offset, actual.len() as u64);
        self.vals[r.clone()].copy_from_slice(actual);
        self.zero_ok[r].fill(false);
        self.clear_alts(offset, actual.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definite_writes_are_exact() {
        let mut m = ContentModel::new(vec![1; 16]);
        m.write(4, &[5, 6]);
        assert!(m.check(0, &[1, 1, 1, 1, 5, 6, 1, 1]).is_ok());
        assert!(m.check(4, &[5, 0]).is_err());
        assert!(m.check(0, &[1; 16]).is_err());
        assert!(m.is_exact());
    }

    #[test]
    fn discard_allows_zero_or_old_but_not_older() {
        let mut m = ContentModel::new(vec![1; 8]);
        m.write(0, &[2; 8]);
        m.discard(0, 8);
        assert!(m.check(0, &[2, 0, 2, 0, 0, 0, 2, 2]).is_ok());
        // The backing's old content must not show through.
        assert!(m.check(0, &[1; 8]).is_err());
        m.write_zeroes(0, 4);
        assert!(m.check(0, &[0, 0, 0, 0, 2, 0, 2, 0]).is_ok());
        m.write(0, &[3; 8]);
        assert!(m.check(0, &[3, 3, 3, 3, 3, 3, 3, 0]).is_err());
    }

    #[test]
    fn maybe_ops_allow_either_and_definite_ops_clear_them() {
        let mut m = ContentModel::new(vec![0; 8]);
        m.write(0, &[1; 8]);
        m.maybe_write(2, &[7; 4]);
        m.maybe_zero(4, 4);
        assert!(m.check(0, &[1, 1, 7, 1, 7, 0, 0, 1]).is_ok());
        assert!(m.check(0, &[1, 1, 0, 1, 1, 1, 1, 1]).is_err());
        m.write(3, &[9, 9]);
        assert!(m.check(2, &[7, 9, 9, 0]).is_ok());
        assert!(m.check(3, &[7]).is_err());
        assert!(m.check(4, &[0]).is_err());
        let mut m2 = m.clone();
        m2.resolve(0, &[1, 1, 7, 9, 9, 0, 1, 0]);
        assert!(m2.is_exact());
        assert_eq!(m2.values(), &[1, 1, 7, 9, 9, 0, 1, 0]);
    }
}
