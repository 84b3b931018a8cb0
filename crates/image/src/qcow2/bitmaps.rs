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
