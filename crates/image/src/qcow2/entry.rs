//! Pure bit helpers for qcow2 L1 and L2 table entries.
//!
//! Every decision about what an entry means is made here and nowhere else
//! ([`L2Entry::decode`]), so extended L2 entries (sub-cluster bitmaps) can
//! later be added in one place. Nothing here does I/O.

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
    fn be64_helpers_round_trip() {
        let mut buf = vec![0u8; 16];
        put_be64(&mut buf, 1, 0x0102_0304_0506_0708);
        assert_eq!(buf[8], 1);
        assert_eq!(get_be64(&buf, 1), 0x0102_0304_0506_0708);
        assert_eq!(l1_table(0x8000_0000_0003_0000), Some(0x30000));
        assert_eq!(l1_table(0), None);
    }
}
