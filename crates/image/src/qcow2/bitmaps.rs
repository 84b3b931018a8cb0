//! Persistent dirty bitmaps (autoclear bit 0 and the bitmaps extension):
//! diskstream does not track them, so a read-write open either refuses or,
//! when asked, discards them.
//!
//! The decision to know: discarding is done so that QEMU sees a consistent
//! image, not merely an invalidated extension with leaked clusters. The
//! header without the extension and its autoclear bit is written (and
//! synced) first, then the bitmaps' clusters are freed; a crash in between
//! leaves only leaks.

use super::Meta;
use super::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header};
use crate::Result;

/// Same limit as qemu (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
const MAX_BITMAP_DIRECTORY: u64 = 1024 * 65536;

/// One bitmap directory entry (the parts diskstream uses).
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub granularity_bits: u8,
    pub name: String,
}

/// The bitmap directory `(offset, size, entries)` when the bitmaps are
/// valid (extension present, autoclear bit set), else `None`.
pub fn directory(m: &Meta) -> Result<Option<(u64, u64, Vec<DirEntry>)>> {
    if m.h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let Some((_, ext)) =
        m.h.other_extensions
            .iter()
            .find(|(ty, _)| *ty == EXT_BITMAPS)
    else {
        return Ok(None);
    };
    if ext.len() < 24 {
        return Err(m.corrupt(format!(
            "bitmaps extension of {} bytes is too short",
            ext.len()
        )));
    }
    let nb = u32::from_be_bytes(ext[0..4].try_into().expect("4"));
    let dir_size = u64::from_be_bytes(ext[8..16].try_into().expect("8"));
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().expect("8"));
    if dir_size > MAX_BITMAP_DIRECTORY {
        return Err(m.corrupt(format!(
            "bitmap directory size {dir_size} is above {MAX_BITMAP_DIRECTORY}"
        )));
    }
    let mut dir = vec![0u8; dir_size as usize];
    m.st.read_at(&mut dir, dir_off)
        .map_err(|e| m.io("read bitmap directory", e))?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    for n in 0..nb {
        if at + 24 > dir.len() {
            return Err(m.corrupt(format!("bitmap directory entry {n} is past its end")));
        }
        let e = &dir[at..at + 24];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = u32::from_be_bytes(e[20..24].try_into().expect("4")) as usize;
        let name_at = at + 24 + extra;
        let name = dir
            .get(name_at..name_at + name_size)
            .ok_or_else(|| m.corrupt(format!("bitmap {n}: name is past the directory")))?;
        entries.push(DirEntry {
            table_offset: u64::from_be_bytes(e[0..8].try_into().expect("8")),
            table_size: u32::from_be_bytes(e[8..12].try_into().expect("4")),
            flags: u32::from_be_bytes(e[12..16].try_into().expect("4")),
            granularity_bits: e[17],
            name: String::from_utf8_lossy(name).into_owned(),
        });
        at += (24 + extra + name_size).next_multiple_of(8);
    }
    Ok(Some((dir_off, dir_size, entries)))
}

/// `format-specific` `bitmaps` as qemu-img info prints it, or `None`
/// without valid bitmaps (or with a damaged directory: info still works).
pub fn info_json(m: &Meta) -> Option<serde_json::Value> {
    let (_, _, entries) = directory(m).ok()??;
    Some(
        entries
            .iter()
            .map(|e| {
                let mut flags = Vec::new();
                if e.flags & 1 != 0 {
                    flags.push("in-use");
                }
                if e.flags & 2 != 0 {
                    flags.push("auto");
                }
                serde_json::json!({
                    "flags": flags,
                    "name": e.name,
                    "granularity": 1u64 << e.granularity_bits.min(63),
                })
            })
            .collect(),
    )
}

/// Whether `h` has bitmaps QEMU considers valid (extension and autoclear
/// bit both present).
pub fn valid(h: &Header) -> bool {
    h.has_bitmaps_ext && h.autoclear_features & AUTOCLEAR_BITMAPS != 0
}

impl Meta {
    /// Discards the persistent bitmaps: header first, then their clusters.
    pub(super) fn drop_bitmaps(&mut self) -> Result<()> {
        let ranges = super::check::bitmap_clusters(self)?;
        let mut h = self.h.clone();
        h.autoclear_features &= !AUTOCLEAR_BITMAPS;
        h.other_extensions.retain(|(ty, _)| *ty != EXT_BITMAPS);
        h.has_bitmaps_ext = false;
        self.write_header(&h)?;
        let cb = self.cluster_bits;
        for (off, len) in ranges {
            if len == 0 {
                continue;
            }
            for c in (off >> cb)..=((off + len - 1) >> cb) {
                self.change_refcount(c, false)?;
            }
        }
        self.flush_meta_with(true)
    }
}
