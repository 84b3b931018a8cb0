//! Pure bit helpers for qcow2 L1 and L2 table entries.
//!
//! Every decision about what an entry means is made here and nowhere else:
//! [`L2Entry::decode`] for the 64-bit descriptor, [`Entry`] for a whole L2
//! entry, standard or extended (128 bits: the descriptor, then a 32-bit
//! allocation bitmap and a 32-bit zero bitmap, one bit per subcluster). The
//! rest of the engine sees an image as clusters of `units` allocation units
//! (1 for standard images, 32 subclusters with extended L2 entries) and asks
//! [`Entry::unit`] what each unit is. Nothing here does I/O.

/// Bit 63 of L1 and L2 entries: the cluster's refcount is exactly one, so it
/// may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Host offset bits 9-55 of L1 entries and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits that must be zero in an L1 entry (1-8 and 56-62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
/// Bits that must be zero in a standard L2 entry (1-8 and 56-61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Compressed sectors are 512 bytes, whatever the cluster size.
pub const COMPRESSED_SECTOR: u64 = 512;

/// What one L2 entry says about its guest cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: the backing shows through.
    Unallocated,
    /// Reads as zeros; `host` is a cluster that stays allocated to it.
    Zero { host: Option<u64>, copied: bool },
    /// Plain data at `host`.
    Normal { host: u64, copied: bool },
    /// Deflate data of `len` bytes (an upper bound) at `host`.
    Compressed { host: u64, len: u64 },
}

impl L2Entry {
    /// Decodes a raw (host-endian) L2 entry of an image with `cluster_bits`.
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        if raw & COMPRESSED != 0 {
            let shift = 62 - (cluster_bits - 8);
            let offset_mask = (1u64 << shift) - 1;
            let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
            let host = raw & offset_mask;
            let sectors = ((raw >> shift) & sectors_mask) + 1;
            let len = sectors * COMPRESSED_SECTOR - (host & (COMPRESSED_SECTOR - 1));
            return L2Entry::Compressed { host, len };
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if raw & ZERO != 0 {
            return L2Entry::Zero {
                host: (host != 0).then_some(host),
                copied,
            };
        }
        if host == 0 {
            return L2Entry::Unallocated;
        }
        L2Entry::Normal { host, copied }
    }

    /// Encodes a standard (not compressed) entry.
    pub fn encode(self) -> u64 {
        let copied = |c: bool| if c { COPIED } else { 0 };
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { host, copied: c } => host.unwrap_or(0) | ZERO | copied(c),
            L2Entry::Normal { host, copied: c } => host | copied(c),
            L2Entry::Compressed { .. } => {
                unreachable!("diskstream never writes compressed entries")
            }
        }
    }

    /// The host clusters this entry holds a reference on, as
    /// `(first cluster offset, count)`.
    pub fn host_clusters(self, cluster_size: u64) -> Option<(u64, u64)> {
        match self {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => Some((host & !(cluster_size - 1), 1)),
            L2Entry::Compressed { host, len } => {
                let first = host & !(cluster_size - 1);
                let last = (host + len - 1) & !(cluster_size - 1);
                Some((first, (last - first) / cluster_size + 1))
            }
            _ => None,
        }
    }

    /// Whether the guest cluster is allocated in this layer.
    pub fn is_allocated(self) -> bool {
        !matches!(self, L2Entry::Unallocated)
    }
}

/// Subclusters per cluster with extended L2 entries (docs/interop/qcow2.rst).
pub const SUBCLUSTERS: u32 = 32;
/// Allocation bits of an extended L2 bitmap (bit x = subcluster x).
pub const ALL_ALLOC: u64 = 0xffff_ffff;
/// Zero bits of an extended L2 bitmap (bit 32 + x = subcluster x).
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;

/// What one allocation unit (a cluster, or a subcluster) of an [`Entry`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// The backing shows through.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data in the host cluster.
    Data,
    /// Part of a compressed cluster (which has no subclusters).
    Compressed,
}

/// A whole L2 entry: the descriptor and, with extended L2 entries, the
/// subcluster bitmap (0 in standard images).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub l2: L2Entry,
    pub bitmap: u64,
    /// The image has extended L2 entries.
    pub ext: bool,
}

impl Entry {
    pub const fn unallocated(ext: bool) -> Entry {
        Entry {
            l2: L2Entry::Unallocated,
            bitmap: 0,
            ext,
        }
    }

    /// Decodes an entry: `bitmap` is ignored unless `ext`. A bitmap that
    /// contradicts its descriptor (allocated subclusters without a host
    /// cluster, a subcluster both allocated and zero) is an error message.
    pub fn decode(raw: u64, bitmap: u64, cluster_bits: u32, ext: bool) -> Result<Entry, String> {
        if !ext {
            return Ok(Entry {
                l2: L2Entry::decode(raw, cluster_bits),
                bitmap: 0,
                ext,
            });
        }
        // As qemu: bit 0 (the all-zeros flag) has no meaning with subclusters.
        let l2 = L2Entry::decode(
            if raw & COMPRESSED != 0 {
                raw
            } else {
                raw & !ZERO
            },
            cluster_bits,
        );
        match l2 {
            // Compressed clusters have no subclusters; qemu ignores the
            // bitmap when reading them (check reports it).
            L2Entry::Compressed { .. } => {}
            L2Entry::Unallocated if bitmap & ALL_ALLOC != 0 => {
                return Err(format!(
                    "extended L2 entry {raw:#x} has no host cluster but allocated subclusters \
                     (bitmap {bitmap:#018x})"
                ));
            }
            L2Entry::Normal { .. } if (bitmap >> 32) & bitmap & ALL_ALLOC != 0 => {
                return Err(format!(
                    "extended L2 entry {raw:#x} has subclusters both allocated and zero \
                     (bitmap {bitmap:#018x})"
                ));
            }
            _ => {}
        }
        Ok(Entry { l2, bitmap, ext })
    }

    /// The raw descriptor and bitmap.
    pub fn encode(self) -> (u64, u64) {
        (self.l2.encode(), if self.ext { self.bitmap } else { 0 })
    }

    /// Allocation units per cluster.
    pub fn units(self) -> u32 {
        if self.ext { SUBCLUSTERS } else { 1 }
    }

    /// The host cluster this entry's data lives in (not for compressed).
    pub fn host(self) -> Option<u64> {
        match self.l2 {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => Some(host),
            _ => None,
        }
    }

    /// What unit `i` (`< units()`) is.
    pub fn unit(self, i: u32) -> Unit {
        match self.l2 {
            L2Entry::Compressed { .. } => Unit::Compressed,
            _ if self.ext => {
                if self.bitmap & (1 << i) != 0 {
                    Unit::Data
                } else if self.bitmap & (1 << (32 + i)) != 0 {
                    Unit::Zero
                } else {
                    Unit::Unallocated
                }
            }
            L2Entry::Unallocated => Unit::Unallocated,
            L2Entry::Zero { .. } => Unit::Zero,
            L2Entry::Normal { .. } => Unit::Data,
        }
    }

    /// Whether any unit is allocated in this layer.
    pub fn is_allocated(self) -> bool {
        (0..self.units()).any(|i| self.unit(i) != Unit::Unallocated)
    }

    /// Units allocated in this layer (data, zero or compressed).
    pub fn allocated_units(self) -> u32 {
        match self.l2 {
            L2Entry::Compressed { .. } => self.units(),
            _ if self.ext => ((self.bitmap | (self.bitmap >> 32)) & ALL_ALLOC).count_ones(),
            other => u32::from(other.is_allocated()),
        }
    }
}

/// The bitmap mask of subclusters `first..first + count`.
pub fn unit_mask(first: u32, count: u32) -> u64 {
    if count >= 32 {
        ALL_ALLOC
    } else {
        ((1u64 << count) - 1) << first
    }
}

/// The L2 table offset of an L1 entry, or `None` when unallocated.
pub fn l1_table(raw: u64) -> Option<u64> {
    let off = raw & OFFSET_MASK;
    (off != 0).then_some(off)
}

/// Reads big-endian u64 `index` of a table buffer.
pub fn get_be64(buf: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(buf[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
}

/// Writes big-endian u64 `index` of a table buffer.
pub fn put_be64(buf: &mut [u8], index: usize, v: u64) {
    buf[index * 8..index * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_standard_entries() {
        assert_eq!(L2Entry::decode(0, 16), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0000, 16),
            L2Entry::Normal {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(1, 16),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            L2Entry::decode(0x8000_0000_0005_0001, 16),
            L2Entry::Zero {
                host: Some(0x50000),
                copied: true
            }
        );
    }

    #[test]
    fn encode_round_trips() {
        for e in [
            L2Entry::Unallocated,
            L2Entry::Zero {
                host: None,
                copied: false,
            },
            L2Entry::Zero {
                host: Some(0x20000),
                copied: true,
            },
            L2Entry::Normal {
                host: 0x7_0000_0000,
                copied: true,
            },
        ] {
            assert_eq!(L2Entry::decode(e.encode(), 16), e);
        }
    }

    #[test]
    fn decodes_compressed_entries() {
        // cluster_bits 16: offset in bits 0..54, sector count in 54..62.
        let raw = COMPRESSED | (3u64 << 54) | 0x1_0200;
        assert_eq!(
            L2Entry::decode(raw, 16),
            L2Entry::Compressed {
                host: 0x1_0200,
                len: 4 * 512
            }
        );
        assert_eq!(
            L2Entry::decode(raw, 16).host_clusters(65536),
            Some((0x1_0000, 1))
        );
        // Spanning two host clusters.
        let raw = COMPRESSED | (1u64 << 54) | 0x1_fe00;
        assert_eq!(
            L2Entry::decode(raw, 16).host_clusters(65536),
            Some((0x1_0000, 2))
        );
    }

    #[test]
    fn extended_entries_give_each_subcluster_its_state() {
        let host = COPIED | 0x5_0000;
        // Subcluster 0 data, 1 zero, 2 unallocated.
        let e = Entry::decode(host, 0b1 | (0b10 << 32), 16, true).unwrap();
        assert_eq!(e.unit(0), Unit::Data);
        assert_eq!(e.unit(1), Unit::Zero);
        assert_eq!(e.unit(2), Unit::Unallocated);
        assert_eq!(e.host(), Some(0x5_0000));
        assert_eq!(e.allocated_units(), 2);
        assert_eq!(e.encode(), (host, 0b1 | (0b10 << 32)));
        // Zero subclusters without a host cluster.
        let e = Entry::decode(0, ALL_ZERO, 16, true).unwrap();
        assert_eq!(e.unit(31), Unit::Zero);
        assert_eq!(e.host(), None);
        // Bit 0 means nothing with subclusters (as in qemu).
        let e = Entry::decode(host | ZERO, 1, 16, true).unwrap();
        assert_eq!(e.unit(0), Unit::Data);
        // Compressed clusters: one unit kind whatever the bitmap says.
        let e = Entry::decode(COMPRESSED | 0x1_0200, 0, 16, true).unwrap();
        assert_eq!(e.unit(5), Unit::Compressed);
        assert_eq!(e.allocated_units(), 32);
    }

    #[test]
    fn extended_entries_reject_contradicting_bitmaps() {
        let err = Entry::decode(0, 1 << 3, 16, true).unwrap_err();
        assert!(err.contains("no host cluster"), "{err}");
        let err = Entry::decode(0x5_0000, (1 << 3) | (1 << 35), 16, true).unwrap_err();
        assert!(err.contains("both allocated and zero"), "{err}");
    }

    #[test]
    fn unit_masks() {
        assert_eq!(unit_mask(0, 32), ALL_ALLOC);
        assert_eq!(unit_mask(2, 3), 0b11100);
        assert_eq!(unit_mask(31, 1), 1 << 31);
    }

    #[test]
    fn be64_helpers_round_trip() {
        let mut buf = vec![0u8; 16];
        put_be64(&mut buf, 1, 0x0102_0304_0506_0708);
        assert_eq!(buf[8], 1);
        assert_eq!(get_be64(&buf, 1), 0x0102_0304_0506_0708);
        assert_eq!(l1_table(0x8000_0000_0003_0000), Some(0x30000));
        assert_eq!(l1_table(0), None);
    }
}
