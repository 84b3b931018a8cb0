//! Internal snapshots: the snapshot table (read and validated, never
//! written: diskstream neither makes nor deletes snapshots) and the
//! copy-on-write of an L2 table the active L1 shares with a snapshot.
//!
//! The decision to know: sharing is counted per reference path, as qemu
//! counts it. A snapshot raises the refcount of every L2 table and data
//! cluster its L1 reaches, so a copied L2 table leaves the refcounts of its
//! data clusters as they are (now two tables reference them) and only the old
//! table loses the active L1's reference, after the new L1 entry is durable.

use std::path::Path;

use super::Meta;
use super::entry::COPIED;
use super::header::{Header, MAX_L1_BYTES};
use crate::format::SnapshotInfo;
use crate::storage::Storage;
use crate::{Error, Result};

/// Same limit as qemu (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Same limit as qemu (QCOW_MAX_SNAPSHOTS_SIZE): 64 MiB of snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One entry of the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// The 64-bit size from the extra data when present, else the 32-bit one.
    pub vm_state_size: u64,
    /// Guest size when the snapshot was taken (extra data, v3).
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(path: &Path, message: String) -> Error {
    Error::InvalidImage {
        path: path.to_owned(),
        format: "qcow2",
        message,
    }
}

/// Reads and validates the snapshot table of `h` (the whole table and every
/// snapshot's L1 table must lie inside the file of `file_len` bytes).
/// Returns the snapshots and the table's length in bytes.
pub fn read_table(
    st: &dyn Storage,
    path: &Path,
    h: &Header,
    file_len: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::with_capacity(h.nb_snapshots.min(1024) as usize);
    if h.nb_snapshots == 0 {
        return Ok((out, 0));
    }
    let cs = h.cluster_size();
    let start = h.snapshots_offset;
    let mut off = start;
    let read = |buf: &mut [u8], at: u64, what: &str| -> Result<()> {
        let end = at.saturating_add(buf.len() as u64);
        if end > file_len || end - start > MAX_TABLE_BYTES {
            return Err(invalid(
                path,
                format!(
                    "snapshot table ({what} at {at:#x}, table at {start:#x}) extends past the end \
                     of the file ({file_len} bytes) or beyond {MAX_TABLE_BYTES} bytes"
                ),
            ));
        }
        st.read_at(buf, at)
            .map_err(|e| Error::io(path, "read snapshot table", e))
    };
    for n in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        read(&mut fixed, off, "entry")?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]);
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]);
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(invalid(
                path,
                format!("snapshot {n}: extra data size {extra_len} is above {MAX_EXTRA_DATA}"),
            ));
        }
        let mut rest = vec![0u8; extra_len as usize + id_len as usize + name_len as usize];
        read(&mut rest, off + 40, "entry")?;
        let extra = &rest[..extra_len as usize];
        let id = &rest[extra_len as usize..extra_len as usize + id_len as usize];
        let name = &rest[extra_len as usize + id_len as usize..];
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("snapshot {n}: l1_size {l1_size} is above {MAX_L1_BYTES} bytes"),
            ));
        }
        if l1_size > 0 && (l1_table_offset == 0 || !l1_table_offset.is_multiple_of(cs)) {
            return Err(invalid(
                path,
                format!(
                    "snapshot {n}: L1 table offset {l1_table_offset:#x} is not cluster aligned"
                ),
            ));
        }
        if l1_table_offset.saturating_add(u64::from(l1_size) * 8) > file_len {
            return Err(invalid(
                path,
                format!(
                    "snapshot {n}: L1 table at {l1_table_offset:#x} ({l1_size} entries) extends \
                     past the end of the file ({file_len} bytes)"
                ),
            ));
        }
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size: (extra.len() >= 16).then(|| be64(extra, 8)),
            icount: (extra.len() >= 24).then(|| be64(extra, 16)),
        });
        off += (40 + rest.len() as u64).next_multiple_of(8);
    }
    Ok((out, off - start))
}

impl Snapshot {
    /// What `info` shows of it, as qemu-img does.
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: u64::from(self.date_nsec),
            vm_clock_nsec: self.vm_clock_nsec,
            // -1 means "none", as a missing field does.
            icount: self.icount.filter(|&c| c != u64::MAX),
        }
    }
}

impl Meta {
    /// Copies the L2 table of L1 index `i` (at `old`, shared with a
    /// snapshot: COPIED clear in the L1 entry) to a new cluster and points
    /// the L1 entry at the copy. The old table's reference from the active
    /// L1 is dropped once the new L1 entry is durable (a queued free).
    /// Returns the new table's offset.
    pub(super) fn cow_l2_table(&mut self, i: usize, old: u64) -> Result<u64> {
        let data: Box<[u8]> = self.l2.get(old).expect("loaded").into();
        let new = self.alloc_clusters(1)?;
        if self.l2.full_of_dirty() {
            self.flush_meta()?;
        }
        self.l2.insert(new, data, true);
        self.l1[i] = new | COPIED;
        self.l1_dirty.insert((i * 8) >> self.cluster_bits);
        self.pending_frees.push((old, 1));
        Ok(new)
    }
}
