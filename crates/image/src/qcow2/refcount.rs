//! Refcounts: reading and writing entries of any width, cluster allocation,
//! refcount-block creation and refcount-table growth.
//!
//! The decision to know: an allocation reserves, in front of its run, one
//! cluster for every refcount block its run (and those clusters) need but
//! that does not exist yet, so a large allocation stays one contiguous run
//! and the new blocks count themselves. When the refcount table itself is
//! full it is copied to a larger place, written and synced, and the header
//! switched to it in one write before the old table is freed.
//!
//! With lazy refcounts (compatible bit 0) the refcount blocks and table stay
//! in memory across flushes (written on close, on `check`, or when the cache
//! is full of them) and the dirty bit is set before anything they do not
//! account for reaches the disk; an image found dirty is rebuilt on open.

use super::Meta;
use super::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use crate::{Error, Result};

/// Reads entry `index` of a refcount block with `1 << order` bit entries.
pub fn get_entry(block: &[u8], order: u32, index: usize) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        let mut v = 0u64;
        for &b in &block[index * n..index * n + n] {
            v = (v << 8) | u64::from(b);
        }
        v
    } else {
        let per_byte = 8 / bits;
        let byte = block[index / per_byte];
        let shift = (index % per_byte) * bits;
        u64::from(byte >> shift) & ((1u64 << bits) - 1)
    }
}

/// Writes entry `index` of a refcount block with `1 << order` bit entries.
pub fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        let bytes = value.to_be_bytes();
        block[index * n..index * n + n].copy_from_slice(&bytes[8 - n..]);
    } else {
        let per_byte = 8 / bits;
        let shift = (index % per_byte) * bits;
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        let b = &mut block[index / per_byte];
        *b = (*b & !mask) | (((value as u8) << shift) & mask);
    }
}

/// The largest refcount an entry of `1 << order` bits holds.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

impl Meta {
    /// Whether this open defers refcount updates: a writable v3 image with
    /// the lazy refcounts compatible bit.
    pub(super) fn lazy_refcounts(&self) -> bool {
        self.writable
            && self.h.version >= 3
            && self.h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Decides, at the start of a metadata flush, whether refcount blocks and
    /// the refcount table stay in memory this time. With lazy refcounts they
    /// do, unless `all_refcounts` or the cache is full of dirty blocks; and
    /// before anything is written that the on-disk refcounts do not account
    /// for, the dirty bit is made durable (as qemu's `qcow2_mark_dirty`), so
    /// the next open rebuilds them.
    pub(super) fn defer_refcounts(&mut self, all_refcounts: bool) -> Result<bool> {
        if !self.lazy_refcounts() {
            return Ok(false);
        }
        let pending = !self.l2.dirty().is_empty()
            || !self.l1_dirty.is_empty()
            || !self.rb.dirty().is_empty()
            || !self.reftable_dirty.is_empty()
            || !self.pending_frees.is_empty();
        if pending && self.h.incompatible_features & INCOMPAT_DIRTY == 0 {
            let mut h = self.h.clone();
            h.incompatible_features |= INCOMPAT_DIRTY;
            self.write_header(&h)?;
        }
        Ok(!all_refcounts && !self.rb.full_of_dirty())
    }

    /// After a full flush on close: every refcount is on disk, so the dirty
    /// bit goes (one header write).
    pub(super) fn mark_clean(&mut self) -> Result<()> {
        if self.lazy_refcounts() && self.h.incompatible_features & INCOMPAT_DIRTY != 0 {
            let mut h = self.h.clone();
            h.incompatible_features &= !INCOMPAT_DIRTY;
            self.write_header(&h)?;
        }
        Ok(())
    }

    /// log2 of the refcount entries per refcount block.
    pub(super) fn rb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.h.refcount_order
    }

    /// The refcount block holding cluster `c`'s refcount, if any.
    fn refblock_of(&self, c: u64) -> Option<u64> {
        let idx = (c >> self.rb_bits()) as usize;
        self.reftable
            .get(idx)
            .map(|e| e & !0x1ff)
            .filter(|&o| o != 0)
    }

    fn load_refblock(&mut self, off: u64) -> Result<()> {
        if self.rb.contains(off) {
            return Ok(());
        }
        if !off.is_multiple_of(self.cluster_size()) {
            return Err(self.corrupt(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        self.check_within_file(off, "refcount block")?;
        if self.rb.full_of_dirty() {
            self.flush_meta()?;
            // The flush applies queued frees, which may have loaded (and
            // changed) this very block: never replace it with a stale copy.
            if self.rb.contains(off) {
                return Ok(());
            }
        }
        let data = self.read_table(off)?;
        self.rb.insert(off, data, false);
        Ok(())
    }

    /// The refcount of host cluster `c` (by index).
    pub(super) fn refcount(&mut self, c: u64) -> Result<u64> {
        let Some(off) = self.refblock_of(c) else {
            return Ok(0);
        };
        self.load_refblock(off)?;
        let i = (c & ((1u64 << self.rb_bits()) - 1)) as usize;
        let order = self.h.refcount_order;
        Ok(get_entry(self.rb.get(off).expect("loaded"), order, i))
    }

    /// Sets the refcount of host cluster `c`, whose block must exist.
    pub(super) fn set_refcount(&mut self, c: u64, value: u64) -> Result<()> {
        let Some(off) = self.refblock_of(c) else {
            return Err(Error::Internal(format!(
                "{}: refcount block for cluster {c} missing",
                self.path.display()
            )));
        };
        if value > max_refcount(self.h.refcount_order) {
            return Err(self.corrupt(format!(
                "refcount of cluster {c} would exceed {}",
                max_refcount(self.h.refcount_order)
            )));
        }
        self.load_refblock(off)?;
        let i = (c & ((1u64 << self.rb_bits()) - 1)) as usize;
        let order = self.h.refcount_order;
        set_entry(self.rb.get_mut(off).expect("loaded"), order, i, value);
        Ok(())
    }

    /// Adds one to, or takes one from, the refcount of cluster `c`.
    pub(super) fn change_refcount(&mut self, c: u64, increase: bool) -> Result<()> {
        let old = self.refcount(c)?;
        let new = if increase {
            old + 1
        } else {
            old.checked_sub(1).ok_or_else(|| {
                self.corrupt(format!(
                    "refcount of cluster {c} (offset {:#x}) would drop below zero",
                    c << self.cluster_bits
                ))
            })?
        };
        self.set_refcount(c, new)?;
        if new == 0 && c < self.free_hint {
            self.free_hint = c;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters and returns the host offset of
    /// the first. Their refcounts are raised in the cache (written before any
    /// L2 table that points at them, see `flush_meta`).
    pub(super) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let rbb = self.rb_bits();
        // Clusters reserved in front of the data for refcount blocks that
        // do not exist yet.
        let mut extra = 0u64;
        loop {
            let start = self.find_free_run(n + extra)?;
            let last_idx = (start + n + extra - 1) >> rbb;
            if last_idx as usize >= self.reftable.len() {
                self.grow_reftable(last_idx)?;
                continue;
            }
            let missing: Vec<u64> = ((start >> rbb)..=last_idx)
                .filter(|&i| self.reftable[i as usize] & !0x1ff == 0)
                .collect();
            if missing.len() as u64 > extra {
                extra = missing.len() as u64;
                continue;
            }
            // New blocks go in front of the data, contiguous, so a large
            // allocation stays one run; then they are counted themselves.
            let k = missing.len() as u64;
            self.check_no_overlap(start, k + n)?;
            // A flush between publishing the new blocks and counting them
            // would make table entries durable that point at uncounted
            // clusters (stays raised on error, see `rc_critical`).
            self.rc_critical += 1;
            for (j, &idx) in missing.iter().enumerate() {
                self.create_refblock(idx, (start + j as u64) << self.cluster_bits)?;
            }
            for c in start..start + k + n {
                self.change_refcount(c, true)?;
            }
            self.rc_critical -= 1;
            if start == self.free_hint {
                self.free_hint = start + k + n;
            }
            return Ok((start + k) << self.cluster_bits);
        }
    }

    /// Refuses to hand out clusters that hold metadata (possible only when
    /// refcounts are wrong: a damaged or hostile image), as qemu's overlap
    /// checks do, instead of overwriting the header or a table.
    fn check_no_overlap(&self, start: u64, n: u64) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = self.cluster_size();
        let end = start + n;
        let overlaps =
            |off: u64, len: u64| len > 0 && (off >> cb) < end && start < (off + len).div_ceil(cs);
        let rt_len = u64::from(self.h.refcount_table_clusters) * cs;
        let l1_len = u64::from(self.h.l1_size) * 8;
        let cached = (start..end).any(|c| self.l2.contains(c << cb) || self.rb.contains(c << cb));
        if start == 0
            || overlaps(self.h.refcount_table_offset, rt_len)
            || overlaps(self.h.l1_table_offset, l1_len)
            || cached
        {
            return Err(self.corrupt(format!(
                "clusters {start}..{end} have refcount zero but hold metadata; refcounts are \
                 wrong (run qemu-img check -r all)"
            )));
        }
        Ok(())
    }

    /// The first run of `n` clusters with refcount zero at or after the
    /// free hint. Ranges without a refcount block are free as a whole; blocks
    /// are scanned in place.
    fn find_free_run(&mut self, n: u64) -> Result<u64> {
        let rbb = self.rb_bits();
        let order = self.h.refcount_order;
        let mut c = self.free_hint;
        let mut run_start = c;
        let mut len = 0u64;
        while len < n {
            let block_end = ((c >> rbb) + 1) << rbb;
            match self.refblock_of(c) {
                None => {
                    if len == 0 {
                        run_start = c;
                    }
                    let take = (block_end - c).min(n - len);
                    len += take;
                    c += take;
                }
                Some(off) => {
                    self.load_refblock(off)?;
                    let block = self.rb.peek(off).expect("loaded");
                    while c < block_end && len < n {
                        let i = (c & ((1u64 << rbb) - 1)) as usize;
                        if get_entry(block, order, i) == 0 {
                            if len == 0 {
                                run_start = c;
                            }
                            len += 1;
                        } else {
                            len = 0;
                        }
                        c += 1;
                    }
                }
            }
        }
        Ok(run_start)
    }

    /// Creates an empty refcount block for block index `idx` at `host`
    /// (a free cluster; the caller counts it).
    fn create_refblock(&mut self, idx: u64, host: u64) -> Result<()> {
        let data = vec![0u8; self.cluster_size() as usize].into_boxed_slice();
        if self.rb.full_of_dirty() {
            self.flush_meta()?;
        }
        self.rb.insert(host, data, true);
        self.reftable[idx as usize] = host;
        let per_cluster = (self.cluster_size() / 8) as usize;
        self.reftable_dirty.insert(idx as usize / per_cluster);
        Ok(())
    }

    /// Moves the refcount table to a place big enough for block `need_idx`.
    fn grow_reftable(&mut self, need_idx: u64) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = cs / 8;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        let entries = (need_idx + 1)
            .max(self.reftable.len() as u64 * 2)
            .next_multiple_of(per_cluster);
        let clusters = entries / per_cluster;
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                format: "qcow2",
                feature: format!(
                    "a refcount table larger than {MAX_REFTABLE_BYTES} bytes (image too large \
                     for its cluster size)"
                ),
            });
        }
        // Until the header switch, flushes write refcount blocks only. On an
        // error this stays raised: nothing that needs the new table may
        // become durable.
        self.rc_critical += 1;
        self.reftable.resize(entries as usize, 0);
        let new_off = self.alloc_clusters(clusters)?;
        // Blocks first, then the table that points at them, then the header.
        self.write_dirty_refblocks()?;
        self.sync()?;
        let mut buf = Vec::with_capacity((clusters * cs) as usize);
        for e in &self.reftable {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        self.write(&buf, new_off, "write refcount table")?;
        self.sync()?;
        let mut h = self.h.clone();
        h.refcount_table_offset = new_off;
        h.refcount_table_clusters = clusters as u32;
        self.write_header(&h)?;
        self.rc_critical -= 1;
        self.reftable_dirty.clear();
        // The header no longer points at the old table: free it.
        for i in 0..old_clusters {
            self.change_refcount((old_off >> self.cluster_bits) + i, false)?;
        }
        Ok(())
    }

    /// Writes every dirty refcount block (no sync).
    pub(super) fn write_dirty_refblocks(&mut self) -> Result<bool> {
        let dirty = self.rb.dirty();
        for off in &dirty {
            let data = self.rb.peek(*off).expect("dirty table is cached").to_vec();
            self.write(&data, *off, "write refcount block")?;
            self.rb.mark_clean(*off);
        }
        Ok(!dirty.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let max = max_refcount(order);
            let entries = (512 * 8) >> order;
            for i in 0..entries {
                set_entry(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i as u64 * 7) & max,
                    "order {order}"
                );
            }
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian() {
        let mut block = vec![0u8; 8];
        set_entry(&mut block, 4, 1, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
    }
}
