//! Consistency check and repair, counting like qemu's `block/qed-check.c`.
//!
//! Every table and data cluster must be aligned, lie past the header and
//! inside the file, and be referenced once. An invalid entry is a
//! corruption; a repair clears it (the guest range then reads from the
//! backing, as qemu's repair does). A cluster nothing references is a leak.
//! QED has no free list, so a leak can only be given back when it sits at
//! the end of the file: a repair truncates such a tail (qemu leaves leaks
//! as they are). The walk uses the in-memory tables, so it sees writes that
//! are not flushed yet; a repair writes them back in the usual order.

use super::{Entry, Meta, get_le64, put_le64};
use crate::Result;
use crate::format::{CheckReport, Repair};

/// A bitmap of referenced host clusters.
struct Used {
    bits: Vec<u64>,
}

impl Used {
    /// Marks `n` clusters from `first`; false if one was already marked
    /// (referenced twice).
    fn mark(&mut self, first: u64, n: u64) -> bool {
        let mut ok = true;
        for c in first..first + n {
            let (w, b) = ((c / 64) as usize, c % 64);
            if self.bits[w] & (1 << b) != 0 {
                ok = false;
            }
            self.bits[w] |= 1 << b;
        }
        ok
    }

    fn is_set(&self, c: u64) -> bool {
        self.bits[(c / 64) as usize] & (1 << (c % 64)) != 0
    }
}

pub(super) fn check(m: &mut Meta, repair: Option<Repair>) -> Result<CheckReport> {
    let fix = repair.is_some();
    let cs = m.cluster_size();
    let bits = m.cluster_bits;
    let nclusters = m.file_end >> bits;
    let mut used = Used {
        bits: vec![0; nclusters.div_ceil(64) as usize],
    };
    let mut r = CheckReport {
        total_clusters: Some(m.h.image_size.div_ceil(cs)),
        allocated_clusters: Some(0),
        fragmented_clusters: Some(0),
        compressed_clusters: Some(0),
        ..CheckReport::default()
    };
    let mut allocated = 0u64;
    let mut fragmented = 0u64;
    let table_clusters = u64::from(m.h.table_size);
    used.mark(m.h.l1_table_offset >> bits, table_clusters);
    for i in 0..m.l1.len() {
        let off = m.l1[i];
        if off == 0 {
            continue;
        }
        if !m.table_offset_ok(off) {
            r.messages.push(format!(
                "ERROR L1 entry {i}: invalid L2 table offset {off:#x}"
            ));
            if fix {
                m.l1[i] = 0;
                m.l1_dirty.insert((i * 8) >> bits);
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
            }
            continue;
        }
        if !used.mark(off >> bits, table_clusters) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR L2 table at {off:#x} (L1 entry {i}) overlaps another cluster in use"
            ));
            continue;
        }
        let t = match m.l2_table(i) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                r.check_errors += 1;
                r.messages
                    .push(format!("ERROR reading L2 table {off:#x}: {e}"));
                continue;
            }
        };
        let n = 1usize << m.table_bits;
        let mut invalid = Vec::new();
        // Fragmentation counts within one table, as qemu counts it.
        let mut last_data = 0u64;
        {
            let table = m.l2.peek(t).expect("loaded");
            for j in 0..n {
                let host = match Entry::decode(get_le64(table, j)) {
                    Entry::Data(host) => host,
                    _ => continue,
                };
                allocated += 1;
                // Hostile offsets may sit near u64::MAX: no overflow.
                if last_data != 0 && last_data.checked_add(cs) != Some(host) {
                    fragmented += 1;
                }
                last_data = host;
                if !m.cluster_offset_ok(host) {
                    invalid.push((j, host));
                    continue;
                }
                if !used.mark(host >> bits, 1) {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "ERROR cluster {host:#x} is referenced more than once"
                    ));
                }
            }
        }
        for (j, host) in invalid {
            r.messages.push(format!(
                "ERROR L2 table {off:#x} entry {j}: invalid cluster offset {host:#x}"
            ));
            if fix {
                put_le64(m.l2.get_mut(t).expect("loaded"), j, 0);
                r.corruptions_fixed += 1;
            } else {
                r.corruptions += 1;
            }
        }
    }
    r.allocated_clusters = Some(allocated);
    r.fragmented_clusters = Some(fragmented);
    let first = u64::from(m.h.header_size);
    let leaked: Vec<u64> = (first..nclusters).filter(|&c| !used.is_set(c)).collect();
    r.leaks = leaked.len() as u64;
    if r.leaks > 0 {
        r.messages.push(format!(
            "Leaked clusters: {} (QED cannot reuse them)",
            r.leaks
        ));
    }
    if fix {
        m.flush_meta()?;
        // Clusters of writes still in flight are not referenced yet; never
        // cut them off.
        if m.allocating == 0 {
            let tail = leaked
                .iter()
                .rev()
                .zip((0..nclusters).rev())
                .take_while(|(l, c)| *l == c)
                .count() as u64;
            if tail > 0 {
                let len = (nclusters - tail) << bits;
                m.st.set_len(len)
                    .map_err(|e| m.io("truncate leaked clusters", e))?;
                m.sync()?;
                m.file_end = len;
                r.leaks -= tail;
                r.leaks_fixed = tail;
            }
        }
        if r.corruptions == 0 && r.check_errors == 0 && m.allocating == 0 {
            // qemu's qed_check_mark_clean.
            m.clear_need_check(true)?;
        }
    }
    Ok(r)
}
