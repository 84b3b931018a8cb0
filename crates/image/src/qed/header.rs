//! The QED header: decoding, validation and encoding (QEMU's
//! `docs/interop/qed_spec.rst`).
//!
//! All fields are little-endian. The fixed part is 64 bytes; the backing
//! file name lives elsewhere in the header clusters (`header_size` clusters
//! at the start of the file), at `backing_filename_offset`. Every field is
//! checked against the spec's limits before anything is allocated from it;
//! each rejection names the field and the limit. Encoding builds the fixed
//! part and the backing name as one buffer (name right after the fixed part,
//! where qemu puts it), so a header rewrite is one positional write.

use std::path::Path;

use crate::{Error, Result};

/// `QED\0` as the first four bytes of the file.
pub const MAGIC: [u8; 4] = *b"QED\0";
/// Bytes of the fixed header (qemu's `sizeof(QEDHeader)`).
pub const HEADER_LEN: usize = 64;

/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image needs a consistency check before use.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw; never probe its format.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Every feature bit this implementation knows (qemu's `QED_FEATURE_MASK`).
pub const FEATURES_KNOWN: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// No compat or autoclear bits are defined (qemu's masks are 0).
pub const AUTOCLEAR_KNOWN: u64 = 0;

/// Cluster size limits, from the spec (`[2^12, 2^26]`).
pub const MIN_CLUSTER_SIZE: u64 = 4 << 10;
pub const MAX_CLUSTER_SIZE: u64 = 64 << 20;
/// Table size limits in clusters, from the spec (a power of two in `[1, 16]`).
pub const MIN_TABLE_SIZE: u32 = 1;
pub const MAX_TABLE_SIZE: u32 = 16;
/// qemu-img's defaults for new images.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;
pub const DEFAULT_TABLE_SIZE: u32 = 4;
/// Longest backing name qemu reads (its `backing_file` buffer is 4096 bytes
/// including the terminating NUL).
pub const MAX_BACKING_NAME: usize = 4095;

/// A decoded, validated QED header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u32,
    /// L1 and L2 table size, in clusters.
    pub table_size: u32,
    /// Clusters before the first regular cluster.
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    pub image_size: u64,
    /// Where the backing name was read from (kept for diagnostics only: an
    /// encode always writes it right after the fixed part).
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
    pub backing_name: Option<String>,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn invalid(path: &Path, message: String) -> Error {
    Error::InvalidImage {
        path: path.to_owned(),
        format: "qed",
        message,
    }
}

impl Header {
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_size.trailing_zeros()
    }

    /// Bytes of one L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size)
    }

    /// Offsets in one table, as a power of two.
    pub fn table_bits(&self) -> u32 {
        (self.table_bytes() / 8).trailing_zeros()
    }

    /// Bytes of the header area, where no regular cluster may start.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * u64::from(self.cluster_size)
    }

    /// The largest image size the tables can map (the spec's
    /// `TABLE_NOFFSETS^2 * cluster_size`), saturating.
    pub fn max_image_size(cluster_size: u64, table_size: u32) -> u64 {
        let n = u64::from(table_size) * cluster_size / 8;
        n.saturating_mul(n).saturating_mul(cluster_size)
    }

    /// Decodes the fixed part from `buf` (at least [`HEADER_LEN`] bytes) and
    /// checks every field that does not need the file: the backing name is
    /// read separately ([`Header::backing_range`]), the table offsets are
    /// checked against the file length by [`Header::check_l1_in_file`].
    pub fn decode(buf: &[u8], path: &Path) -> Result<Header> {
        if buf.len() < HEADER_LEN {
            return Err(invalid(
                path,
                format!("file too short for a header ({} bytes)", buf.len()),
            ));
        }
        if buf[..4] != MAGIC {
            return Err(invalid(path, "bad magic (not QED\\0)".into()));
        }
        let h = Header {
            cluster_size: le32(buf, 4),
            table_size: le32(buf, 8),
            header_size: le32(buf, 12),
            features: le64(buf, 16),
            compat_features: le64(buf, 24),
            autoclear_features: le64(buf, 32),
            l1_table_offset: le64(buf, 40),
            image_size: le64(buf, 48),
            backing_filename_offset: le32(buf, 56),
            backing_filename_size: le32(buf, 60),
            backing_name: None,
        };
        let cs = u64::from(h.cluster_size);
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(invalid(
                path,
                format!(
                    "cluster_size {cs} is not a power of two from {MIN_CLUSTER_SIZE} to \
                     {MAX_CLUSTER_SIZE}"
                ),
            ));
        }
        if !h.table_size.is_power_of_two()
            || !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&h.table_size)
        {
            return Err(invalid(
                path,
                format!(
                    "table_size {} is not a power of two from {MIN_TABLE_SIZE} to \
                     {MAX_TABLE_SIZE} clusters",
                    h.table_size
                ),
            ));
        }
        if h.header_size == 0 {
            return Err(invalid(path, "header_size 0 (at least one cluster)".into()));
        }
        let unknown = h.features & !FEATURES_KNOWN;
        if unknown != 0 {
            // The spec: an image with unknown feature bits must not be opened.
            return Err(Error::Unsupported {
                path: path.to_owned(),
                format: "qed",
                feature: format!("unknown feature bits {unknown:#x}"),
            });
        }
        if h.image_size % 512 != 0 {
            return Err(invalid(
                path,
                format!("image_size {} is not a multiple of 512", h.image_size),
            ));
        }
        let max = Header::max_image_size(cs, h.table_size);
        if h.image_size > max {
            return Err(invalid(
                path,
                format!(
                    "image_size {} is above {max}, the most {cs}-byte clusters and {}-cluster \
                     tables can map",
                    h.image_size, h.table_size
                ),
            ));
        }
        if h.l1_table_offset % cs != 0 || h.l1_table_offset < h.header_bytes() {
            return Err(invalid(
                path,
                format!(
                    "l1_table_offset {:#x} is not cluster aligned or lies in the {}-byte header",
                    h.l1_table_offset,
                    h.header_bytes()
                ),
            ));
        }
        if h.features & F_BACKING_FILE != 0 {
            let end = u64::from(h.backing_filename_offset) + u64::from(h.backing_filename_size);
            if end > h.header_bytes() {
                return Err(invalid(
                    path,
                    format!(
                        "backing file name ({} bytes at {}) extends past the {}-byte header",
                        h.backing_filename_size,
                        h.backing_filename_offset,
                        h.header_bytes()
                    ),
                ));
            }
            if h.backing_filename_size as usize > MAX_BACKING_NAME {
                return Err(invalid(
                    path,
                    format!(
                        "backing file name of {} bytes is longer than {MAX_BACKING_NAME}",
                        h.backing_filename_size
                    ),
                ));
            }
        }
        Ok(h)
    }

    /// Where the backing name is stored, when there is one.
    pub fn backing_range(&self) -> Option<(u64, usize)> {
        (self.features & F_BACKING_FILE != 0).then_some((
            u64::from(self.backing_filename_offset),
            self.backing_filename_size as usize,
        ))
    }

    /// Takes the backing name read from [`Header::backing_range`].
    pub fn set_backing_bytes(&mut self, bytes: &[u8], path: &Path) -> Result<()> {
        let name = std::str::from_utf8(bytes)
            .map_err(|_| invalid(path, "backing file name is not UTF-8".into()))?;
        if name.is_empty() || name.contains('\0') {
            return Err(invalid(
                path,
                "backing file name is empty or holds a NUL byte".into(),
            ));
        }
        self.backing_name = Some(name.to_owned());
        Ok(())
    }

    /// The L1 table must lie inside the file (checked before it is read, so
    /// a hostile offset cannot make us allocate or read past the end).
    pub fn check_l1_in_file(&self, file_len: u64, path: &Path) -> Result<()> {
        let end = self.l1_table_offset.saturating_add(self.table_bytes());
        if end > file_len {
            return Err(invalid(
                path,
                format!(
                    "L1 table ({:#x}..{end:#x}) extends past the end of the file ({file_len} \
                     bytes)",
                    self.l1_table_offset
                ),
            ));
        }
        Ok(())
    }

    /// The fixed part followed by the backing name (if any), ready for one
    /// write at offset 0. The name goes right after the fixed part; it must
    /// fit in the header clusters.
    pub fn encode(&self, path: &Path) -> Result<Vec<u8>> {
        let mut h = self.clone();
        let name = h.backing_name.clone().unwrap_or_default();
        if h.backing_name.is_some() {
            h.features |= F_BACKING_FILE;
            h.backing_filename_offset = HEADER_LEN as u32;
            h.backing_filename_size = name.len() as u32;
        } else {
            h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
            h.backing_filename_offset = 0;
            h.backing_filename_size = 0;
        }
        if name.len() > MAX_BACKING_NAME || (HEADER_LEN + name.len()) as u64 > h.header_bytes() {
            return Err(Error::InvalidInput(format!(
                "{}: backing file name of {} bytes does not fit in the {}-byte QED header",
                path.display(),
                name.len(),
                h.header_bytes()
            )));
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + name.len());
        buf.extend_from_slice(&MAGIC);
        for v in [h.cluster_size, h.table_size, h.header_size] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            h.features,
            h.compat_features,
            h.autoclear_features,
            h.l1_table_offset,
            h.image_size,
        ] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.extend_from_slice(&h.backing_filename_offset.to_le_bytes());
        buf.extend_from_slice(&h.backing_filename_size.to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            cluster_size: 64 << 10,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 64 << 10,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
            backing_name: None,
        }
    }

    fn decode(h: &Header) -> Result<Header> {
        Header::decode(&h.encode(Path::new("t")).unwrap(), Path::new("t"))
    }

    #[test]
    fn header_round_trips_with_backing_name() {
        let mut h = sample();
        h.backing_name = Some("base.raw".into());
        h.features = F_BACKING_FORMAT_NO_PROBE;
        let buf = h.encode(Path::new("t")).unwrap();
        let mut d = Header::decode(&buf, Path::new("t")).unwrap();
        assert_eq!(d.backing_range(), Some((64, 8)));
        let (at, n) = d.backing_range().unwrap();
        d.set_backing_bytes(&buf[at as usize..at as usize + n], Path::new("t"))
            .unwrap();
        assert_eq!(d.backing_name.as_deref(), Some("base.raw"));
        assert_eq!(d.features, F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
    }

    #[test]
    fn header_rejects_cluster_size_out_of_range() {
        for cs in [2048, 3 << 12, 128 << 20] {
            let mut h = sample();
            h.cluster_size = cs;
            let e = decode(&h).unwrap_err().to_string();
            assert!(e.contains("cluster_size"), "{e}");
        }
    }

    #[test]
    fn header_rejects_table_size_out_of_range() {
        for ts in [0, 3, 32] {
            let mut h = sample();
            h.table_size = ts;
            let e = decode(&h).unwrap_err().to_string();
            assert!(e.contains("table_size"), "{e}");
        }
    }

    #[test]
    fn header_rejects_unknown_features_but_not_unknown_compat_bits() {
        let mut h = sample();
        h.features = 0x10;
        let e = decode(&h).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        let mut h = sample();
        h.compat_features = 0x10;
        h.autoclear_features = 0x20;
        assert!(decode(&h).is_ok());
    }

    #[test]
    fn header_rejects_image_size_beyond_the_tables() {
        let mut h = sample();
        h.cluster_size = 4096;
        h.table_size = 1;
        h.l1_table_offset = 4096;
        h.image_size = 512 * 512 * 4096 + 512;
        assert!(decode(&h).unwrap_err().to_string().contains("image_size"));
        h.image_size = 513;
        assert!(
            decode(&h)
                .unwrap_err()
                .to_string()
                .contains("multiple of 512")
        );
    }

    #[test]
    fn header_rejects_l1_in_header_or_unaligned() {
        let mut h = sample();
        h.l1_table_offset = 0;
        assert!(
            decode(&h)
                .unwrap_err()
                .to_string()
                .contains("l1_table_offset")
        );
        h.l1_table_offset = (64 << 10) + 512;
        assert!(
            decode(&h)
                .unwrap_err()
                .to_string()
                .contains("l1_table_offset")
        );
    }

    #[test]
    fn header_rejects_backing_name_outside_header() {
        let mut h = sample();
        h.backing_name = Some("b".into());
        let mut buf = h.encode(Path::new("t")).unwrap();
        buf[56..60].copy_from_slice(&(64u32 << 10).to_le_bytes());
        let e = Header::decode(&buf, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("backing file name"), "{e}");
    }
}
