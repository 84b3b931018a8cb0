//! Consistency check and repair, counting like `qemu-img check`.
//!
//! The reference counts every cluster should have are rebuilt from the
//! header, the L1/L2 tables, the snapshot table and the refcount structures
//! themselves, then compared with what the refcount blocks say: more on disk
//! is a leak, less is a corruption. `Repair::Leaks` lowers leaked refcounts in
//! place. `Repair::All` with corruptions writes a whole new refcount
//! structure past the end of the file and switches the header to it in one
//! write (the old structure is not touched until then, so a crash during the
//! repair leaves the old state), as qemu's `rebuild_refcount_structure` does.

use super::Meta;
use super::entry::{
    ALL_ALLOC, COMPRESSED, COPIED, Entry, L2Entry, OFFSET_MASK, get_be64, l1_table,
};
use super::refcount::{max_refcount, set_entry};
use crate::Result;
use crate::format::{CheckReport, Repair};

/// Reference counts computed from the metadata.
struct Walk {
    refs: Vec<u64>,
    /// Clusters past this index are not counted but reported: a hostile
    /// offset must not make the walk allocate terabytes.
    limit: u64,
    report: CheckReport,
    /// (table offset, index, raw entry, is L1) of active L1/L2 entries with a
    /// host cluster, to compare their COPIED flag with the refcount.
    flagged: Vec<(u64, usize, u64, bool)>,
    /// (file offset, repaired value) of contradicting subcluster bitmaps.
    bad_bitmaps: Vec<(u64, u64)>,
}

impl Walk {
    fn inc(&mut self, cluster_bits: u32, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> cluster_bits;
        let last = off.saturating_add(len - 1) >> cluster_bits;
        if last >= self.limit {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR offset={off:#x} length {len}: reference far beyond the end of the image"
            ));
            return;
        }
        if self.refs.len() <= last as usize {
            self.refs.resize(last as usize + 1, 0);
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
    }
}

fn read_u64s(m: &Meta, off: u64, count: usize) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; count * 8];
    m.st.read_at(&mut buf, off)
        .map_err(|e| m.io("read metadata", e))?;
    Ok((0..count).map(|i| get_be64(&buf, i)).collect())
}

/// Walks one L1 table and its L2 tables.
fn walk_l1(m: &Meta, w: &mut Walk, l1_off: u64, l1: &[u64], active: bool) -> Result<()> {
    let cb = m.cluster_bits;
    let cs = 1u64 << cb;
    w.inc(cb, l1_off, l1.len() as u64 * 8);
    for (i, &raw) in l1.iter().enumerate() {
        let Some(l2_off) = l1_table(raw) else {
            continue;
        };
        if l2_off % cs != 0 {
            w.report.corruptions += 1;
            w.report.messages.push(format!(
                "ERROR l2_offset={l2_off:#x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            continue;
        }
        w.inc(cb, l2_off, cs);
        if active {
            w.flagged.push((l1_off, i, raw, true));
        }
        let l2 = read_u64s(m, l2_off, (cs / 8) as usize)?;
        let mut next_contiguous = 0u64;
        // With extended L2 entries, every other word is a subcluster bitmap.
        let words = if m.ext { 2 } else { 1 };
        for (j, &e) in l2.iter().enumerate().step_by(words) {
            let bitmap = if m.ext { l2[j + 1] } else { 0 };
            let bitmap_at = l2_off + (j as u64 + 1) * 8;
            let entry = match Entry::decode(e, bitmap, cb, m.ext) {
                Ok(x) => x.l2,
                Err(msg) => {
                    w.report.corruptions += 1;
                    w.report.messages.push(format!(
                        "ERROR L2 table {l2_off:#x} entry {}: {msg}",
                        j / words
                    ));
                    let l2 = L2Entry::decode(e & !1, cb);
                    // The repair keeps the data: allocation wins over zero;
                    // without a host cluster nothing can be allocated.
                    let fixed = if l2.is_allocated() {
                        bitmap & !((bitmap & ALL_ALLOC) << 32)
                    } else {
                        bitmap & !ALL_ALLOC
                    };
                    w.bad_bitmaps.push((bitmap_at, fixed));
                    l2
                }
            };
            if m.ext && e & COMPRESSED != 0 && bitmap != 0 {
                w.report.corruptions += 1;
                w.report.messages.push(format!(
                    "ERROR compressed cluster {} with non-zero subcluster allocation bitmap, \
                     entry={e:#x}",
                    j / words
                ));
                w.bad_bitmaps.push((bitmap_at, 0));
            }
            match entry {
                L2Entry::Compressed { host, len } => {
                    if e & COPIED != 0 {
                        w.report.corruptions += 1;
                        w.report.messages.push(format!(
                            "ERROR: coffset={host:#x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                    }
                    w.inc(cb, host, len);
                    if active {
                        w.report.allocated_clusters =
                            Some(w.report.allocated_clusters.unwrap_or(0) + 1);
                        w.report.compressed_clusters =
                            Some(w.report.compressed_clusters.unwrap_or(0) + 1);
                        w.report.fragmented_clusters =
                            Some(w.report.fragmented_clusters.unwrap_or(0) + 1);
                    }
                }
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } => {
                    if active {
                        w.report.allocated_clusters =
                            Some(w.report.allocated_clusters.unwrap_or(0) + 1);
                        if next_contiguous != 0 && host != next_contiguous {
                            w.report.fragmented_clusters =
                                Some(w.report.fragmented_clusters.unwrap_or(0) + 1);
                        }
                        next_contiguous = host + cs;
                        w.flagged.push((l2_off, j, e, false));
                    }
                    w.inc(cb, host, cs);
                    if host % cs != 0 {
                        w.report.corruptions += 1;
                        w.report.messages.push(format!(
                            "ERROR offset={host:#x}: Cluster is not properly aligned; L2 entry \
                             corrupted."
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Bitmap tables are at most this many entries here (qemu's own bound is
/// derived from the image size; this one only keeps allocations sane).
const MAX_BITMAP_TABLE: u32 = 1 << 24;

/// References held by persistent bitmaps: the directory, each bitmap table
/// and its data clusters. Like qemu, only while the autoclear bit says the
/// bitmaps extension is valid.
fn walk_bitmaps(m: &Meta, w: &mut Walk) -> Result<()> {
    for (off, len) in bitmap_clusters(m)? {
        w.inc(m.cluster_bits, off, len);
    }
    Ok(())
}

/// The byte ranges `(offset, length)` persistent bitmaps hold references
/// on (directory, bitmap tables, data clusters), or none when the autoclear
/// bit says the bitmaps extension is not valid.
pub(super) fn bitmap_clusters(m: &Meta) -> Result<Vec<(u64, u64)>> {
    let cb = m.cluster_bits;
    let mut out = Vec::new();
    let Some((dir_off, dir_size, entries)) = super::bitmaps::directory(m)? else {
        return Ok(out);
    };
    out.push((dir_off, dir_size));
    for (n, e) in entries.iter().enumerate() {
        if e.table_size > MAX_BITMAP_TABLE {
            return Err(m.corrupt(format!(
                "bitmap {n}: table size {} is above {MAX_BITMAP_TABLE}",
                e.table_size
            )));
        }
        out.push((e.table_offset, u64::from(e.table_size) * 8));
        for entry in read_u64s(m, e.table_offset, e.table_size as usize)? {
            let off = entry & OFFSET_MASK;
            if off != 0 {
                out.push((off, 1 << cb));
            }
        }
    }
    Ok(out)
}

/// Computes the expected refcounts of every cluster.
fn walk(m: &Meta) -> Result<Walk> {
    let cb = m.cluster_bits;
    let cs = 1u64 << cb;
    let file_clusters = m.st.len().map_err(|e| m.io("stat", e))?.div_ceil(cs);
    let mut w = Walk {
        refs: Vec::new(),
        // 2^20 clusters of slack past the end of the file (8 MiB of counters).
        limit: file_clusters + (1 << 20),
        report: CheckReport {
            allocated_clusters: Some(0),
            fragmented_clusters: Some(0),
            compressed_clusters: Some(0),
            total_clusters: Some(m.h.size.div_ceil(cs)),
            ..CheckReport::default()
        },
        flagged: Vec::new(),
        bad_bitmaps: Vec::new(),
    };
    w.inc(cb, 0, cs);
    walk_l1(m, &mut w, m.h.l1_table_offset, &m.l1, true)?;
    if m.h.nb_snapshots > 0 {
        // The snapshot table and every snapshot's L1 and L2 tables.
        let file_len = m.st.len().map_err(|e| m.io("stat", e))?;
        let (snaps, len) = super::snapshot::read_table(&*m.st, &m.path, &m.h, file_len)?;
        for s in &snaps {
            let l1 = read_u64s(m, s.l1_table_offset, s.l1_size as usize)?;
            walk_l1(m, &mut w, s.l1_table_offset, &l1, false)?;
        }
        w.inc(cb, m.h.snapshots_offset, len);
    }
    walk_bitmaps(m, &mut w)?;
    w.inc(
        cb,
        m.h.refcount_table_offset,
        u64::from(m.h.refcount_table_clusters) * cs,
    );
    let file_len = m.st.len().map_err(|e| m.io("stat", e))?;
    for (i, &e) in m.reftable.iter().enumerate() {
        let off = e & !0x1ff;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            w.report.corruptions += 1;
            w.report.messages.push(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            continue;
        }
        if off >= file_len {
            w.report.corruptions += 1;
            w.report
                .messages
                .push(format!("ERROR refcount block {i} is outside image"));
            continue;
        }
        w.inc(cb, off, cs);
    }
    Ok(w)
}

/// One check pass; with `repair`, fixes what it may and says how much.
fn check_once(m: &mut Meta, repair: Option<Repair>) -> Result<(CheckReport, Vec<u64>)> {
    let cs = m.cluster_size();
    let mut w = walk(m)?;
    let file_len = m.st.len().map_err(|e| m.io("stat", e))?;
    let n = (w.refs.len() as u64).max(file_len.div_ceil(cs));
    w.refs.resize(n as usize, 0);
    let mut highest = 0u64;
    let mut leaked = Vec::new();
    for c in 0..n {
        let on_disk = m.refcount(c)?;
        let want = w.refs[c as usize];
        if on_disk > 0 || want > 0 {
            highest = c;
        }
        if on_disk == want {
            continue;
        }
        if on_disk > want {
            w.report.leaks += 1;
            leaked.push(c);
            w.report.messages.push(format!(
                "Leaked cluster {c} refcount={on_disk} reference={want}"
            ));
        } else {
            w.report.corruptions += 1;
            w.report.messages.push(format!(
                "ERROR cluster {c} refcount={on_disk} reference={want}"
            ));
        }
    }
    // Active entries: COPIED must say "refcount is one".
    let mut bad_flags = Vec::new();
    for &(table, i, raw, is_l1) in &w.flagged {
        let host = raw & OFFSET_MASK;
        let want = w.refs.get((host / cs) as usize).copied().unwrap_or(0);
        let on_disk = m.refcount(host / cs)?;
        if (on_disk == 1) != (raw & COPIED != 0) {
            w.report.corruptions += 1;
            w.report.messages.push(format!(
                "ERROR OFLAG_COPIED {}: offset={host:#x} refcount={on_disk}",
                if is_l1 { "L2 cluster" } else { "data cluster" }
            ));
            bad_flags.push((table, i, raw, is_l1, want == 1));
        }
    }
    w.report.image_end_offset = Some((highest + 1) * cs);
    match repair {
        Some(Repair::All) if w.report.corruptions > 0 => {
            rebuild_refcounts(m, w.refs.clone())?;
            for &(at, fixed) in &w.bad_bitmaps {
                m.write(&fixed.to_be_bytes(), at, "fix subcluster bitmap")?;
            }
            for &(table, i, raw, is_l1, copied) in &bad_flags {
                let fixed = if copied { raw | COPIED } else { raw & !COPIED };
                m.write(
                    &fixed.to_be_bytes(),
                    table + i as u64 * 8,
                    "fix COPIED flag",
                )?;
                if is_l1 {
                    m.l1[i] = fixed;
                }
            }
            m.l2.clear();
            m.sync()?;
            w.report.corruptions_fixed = w.report.corruptions;
            w.report.leaks_fixed = w.report.leaks;
        }
        // Leaked clusters have a refcount block (their count is not zero):
        // lowering them in place never allocates.
        Some(_) if !leaked.is_empty() => {
            for &c in &leaked {
                let want = w.refs[c as usize];
                m.set_refcount(c, want)?;
                if want == 0 && c < m.free_hint {
                    m.free_hint = c;
                }
            }
            m.flush_meta_with(true)?;
            w.report.leaks_fixed = leaked.len() as u64;
        }
        _ => {}
    }
    Ok((w.report, w.refs))
}

/// Checks, repairs as allowed, and reports like `qemu-img check`: after a
/// repair the counters come from a second pass, the `*_fixed` from the first.
pub(super) fn check(m: &mut Meta, repair: Option<Repair>) -> Result<CheckReport> {
    m.flush_meta_with(true)?;
    let (first, _) = check_once(m, repair)?;
    if first.leaks_fixed == 0 && first.corruptions_fixed == 0 {
        return Ok(first);
    }
    let (mut again, _) = check_once(m, None)?;
    again.leaks_fixed = first.leaks_fixed;
    again.corruptions_fixed = first.corruptions_fixed;
    let mut messages = first.messages;
    messages.append(&mut again.messages);
    again.messages = messages;
    Ok(again)
}

/// Writes a new refcount structure for `refs` past the end of the file and
/// points the header at it (one write), also clearing the dirty bit.
fn rebuild_refcounts(m: &mut Meta, mut refs: Vec<u64>) -> Result<()> {
    let cb = m.cluster_bits;
    let cs = 1u64 << cb;
    // The old refcount structure is dropped with the header switch: its
    // clusters must not keep the references the walk gave them.
    let mut drop_ref = |off: u64| {
        if let Some(r) = refs.get_mut((off >> cb) as usize) {
            *r = r.saturating_sub(1);
        }
    };
    for i in 0..u64::from(m.h.refcount_table_clusters) {
        drop_ref(m.h.refcount_table_offset + i * cs);
    }
    for &e in &m.reftable {
        let off = e & !0x1ff;
        if off != 0 && off % cs == 0 {
            drop_ref(off);
        }
    }
    let order = m.h.refcount_order;
    let per_block = (cs * 8) >> order;
    let file_clusters = m.st.len().map_err(|e| m.io("stat", e))?.div_ceil(cs);
    let start = (refs.len() as u64).max(file_clusters);
    let (mut rb_count, mut rt_clusters) = (1u64, 1u64);
    loop {
        let total = start + rb_count + rt_clusters;
        let rb = total.div_ceil(per_block);
        let rt = (rb * 8).div_ceil(cs).max(1);
        if rb == rb_count && rt == rt_clusters {
            break;
        }
        rb_count = rb;
        rt_clusters = rt;
    }
    if rt_clusters * cs > super::header::MAX_REFTABLE_BYTES {
        return Err(m.corrupt("a rebuilt refcount table would exceed the size limit".into()));
    }
    let total = start + rb_count + rt_clusters;
    refs.resize(total as usize, 0);
    for c in start..total {
        refs[c as usize] = 1;
    }
    let max = max_refcount(order);
    let mut blocks = vec![0u8; (rb_count * cs) as usize];
    for (c, &r) in refs.iter().enumerate() {
        if r > max {
            return Err(m.corrupt(format!("cluster {c} is referenced {r} times, above {max}")));
        }
        if r > 0 {
            let b = c as u64 / per_block;
            let i = (c as u64 % per_block) as usize;
            let blk = &mut blocks[(b * cs) as usize..((b + 1) * cs) as usize];
            set_entry(blk, order, i, r);
        }
    }
    let rb_off = start * cs;
    let rt_off = rb_off + rb_count * cs;
    let mut table = vec![0u64; (rt_clusters * cs / 8) as usize];
    for (b, t) in table.iter_mut().enumerate().take(rb_count as usize) {
        *t = rb_off + b as u64 * cs;
    }
    let tbuf: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    m.write(&blocks, rb_off, "write refcount blocks")?;
    m.write(&tbuf, rt_off, "write refcount table")?;
    m.sync()?;
    let mut h = m.h.clone();
    h.refcount_table_offset = rt_off;
    h.refcount_table_clusters = rt_clusters as u32;
    h.incompatible_features &= !super::header::INCOMPAT_DIRTY;
    m.write_header(&h)?;
    m.reftable = table;
    m.reftable_dirty.clear();
    m.rb.clear();
    m.free_hint = 0;
    Ok(())
}
