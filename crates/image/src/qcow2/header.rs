//! The qcow2 on-disk header and its extensions (docs/interop/qcow2.rst).
//!
//! [`Header::decode`] reads explicit big-endian fields and validates every
//! one against an explicit limit before anything is allocated from it;
//! [`Header::encode`] builds the header, its extensions and the backing name
//! as one buffer that fits in the first cluster (and 4 KiB), so a header
//! update is one positional write. Extensions diskstream does not interpret
//! are kept byte for byte and written back.

use std::path::Path;

use crate::{Error, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header diskstream writes (with compression type
/// and padding, as qemu-img writes it).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest and largest cluster_bits (512 B .. 2 MiB), same limits as qemu.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of 16 KiB or more (qcow2.rst: 32
/// subclusters of at least 512 bytes).
pub const MIN_CLUSTER_BITS_EXTL2: u32 = 14;
/// Same limit as qemu (QCOW_MAX_L1_SIZE): 32 MiB of L1 table.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Same limit as qemu (QCOW_MAX_REFTABLE_SIZE): 8 MiB of refcount table.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Same limit as qemu (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Same limit as qemu: backing file names are at most 1023 bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Same limit as qemu (QCOW_MAX_BACKING_FILE_FORMAT... ext length bound).
pub const MAX_EXTENSION_LEN: u32 = 1 << 16;
/// Header writes stay within this many bytes (and the first cluster).
pub const MAX_HEADER_WRITE: u64 = 4096;

// Feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Compression types (header byte 104).
pub const COMPRESSION_ZLIB: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;

/// The compression type must be one diskstream reads, and (as qemu
/// requires) a type other than zlib needs the compression type
/// incompatible bit, and the bit a type other than zlib.
pub fn check_compression_type(h: &Header, path: &Path) -> Result<()> {
    let bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
    match h.compression_type {
        COMPRESSION_ZLIB if bit => Err(invalid(
            path,
            "the compression type bit is set but compression_type is 0 (zlib)".into(),
        )),
        COMPRESSION_ZLIB => Ok(()),
        COMPRESSION_ZSTD if !bit => Err(invalid(
            path,
            "compression_type 1 (zstd) without the compression type incompatible bit".into(),
        )),
        COMPRESSION_ZSTD => Ok(()),
        t => Err(Error::Unsupported {
            path: path.to_owned(),
            format: "qcow2",
            feature: format!("compression_type {t} (known: 0 zlib, 1 zstd)"),
        }),
    }
}

// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// diskstream's record of a remote backing's identity (JSON of
/// [`crate::identity::BackingIdentity`]). ASCII "dsID"; not a magic QEMU
/// defines (docs/interop/qcow2.rst lists 0xe2792aca, 0x6803f857, 0x23852875,
/// 0x0537be77, 0x44415441), so QEMU treats it as unknown and keeps it: its
/// `qcow2_read_extensions` stores unknown extensions and
/// `qcow2_update_header` writes them back.
pub const EXT_BACKING_IDENTITY: u32 = 0x6473_4944;

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The feature names qemu-img writes into new images.
pub fn default_feature_table() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.into(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

/// The decoded header. Sizes and offsets are validated; tables are not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_name: Option<String>,
    pub backing_format: Option<String>,
    /// `None` when the image has no feature name table.
    pub feature_table: Option<Vec<FeatureName>>,
    pub data_file: Option<String>,
    pub has_bitmaps_ext: bool,
    pub has_crypto_ext: bool,
    /// Extensions kept as they are (type, payload), in file order.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Tables must end at or below this offset: qemu's `qcow2_validate_table`
/// hands offsets to functions taking int64_t.
const TABLE_END_MAX: u64 = i64::MAX as u64;
/// The fixed part of a snapshot table entry (qemu's QCowSnapshotHeader),
/// the per-entry size qemu's header check uses.
const SNAPSHOT_HEADER_LEN: u64 = 40;

fn table_ends_in_range(offset: u64, bytes: u64) -> bool {
    offset
        .checked_add(bytes)
        .is_some_and(|end| end <= TABLE_END_MAX)
}

fn invalid(path: &Path, message: String) -> Error {
    Error::InvalidImage {
        path: path.to_owned(),
        format: "qcow2",
        message,
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L2 entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed for `size` bytes with `cluster_bits`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        Self::l1_entries_ext(size, cluster_bits, false)
    }

    /// L1 entries needed for `size` bytes with `cluster_bits`, with
    /// extended (16-byte) L2 entries when `extended_l2`.
    pub fn l1_entries_ext(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
        let per_l2 = 1u64 << (cluster_bits * 2 - 3 - u32::from(extended_l2));
        size.div_ceil(per_l2)
    }

    /// The image has extended L2 entries (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// The fixed fields only: how many bytes [`Header::decode`] needs to see
    /// first, and the cluster size that bounds the rest.
    pub fn peek_cluster_bits(buf: &[u8], path: &Path) -> Result<u32> {
        if buf.len() < V2_HEADER_LEN as usize || buf[0..4] != MAGIC {
            return Err(invalid(path, "bad magic (not a qcow2 image)".into()));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                path,
                format!(
                    "cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
                ),
            ));
        }
        Ok(cluster_bits)
    }

    /// Decodes and validates the header in `buf` (the first cluster of the
    /// file, or as much of it as exists).
    pub fn decode(buf: &[u8], path: &Path) -> Result<Header> {
        let cluster_bits = Self::peek_cluster_bits(buf, path)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                format: "qcow2",
                feature: format!("version {version} (only 2 and 3 are known)"),
            });
        }
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        let l1_size = be32(buf, 36);
        let l1_table_offset = be64(buf, 40);
        let refcount_table_offset = be64(buf, 48);
        let refcount_table_clusters = be32(buf, 56);
        let nb_snapshots = be32(buf, 60);
        let snapshots_offset = be64(buf, 64);
        let mut h = Header {
            version,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_name: None,
            backing_format: None,
            feature_table: None,
            data_file: None,
            has_bitmaps_ext: false,
            has_crypto_ext: false,
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(invalid(path, "version 3 header is truncated".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(invalid(
                    path,
                    format!("header_length {} is below 104", h.header_length),
                ));
            }
            if u64::from(h.header_length) > cluster_size.min(buf.len() as u64) {
                return Err(invalid(
                    path,
                    format!(
                        "header_length {} exceeds the cluster size {cluster_size}",
                        h.header_length
                    ),
                ));
            }
            if h.header_length >= 105 {
                h.compression_type = buf[104];
            }
            if h.refcount_order > 6 {
                return Err(invalid(
                    path,
                    format!("refcount_order {} is above 6", h.refcount_order),
                ));
            }
        }
        if size > (1u64 << 62) {
            return Err(invalid(path, format!("size {size} is above 2^62")));
        }
        let extended_l2 = h.incompatible_features & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < MIN_CLUSTER_BITS_EXTL2 {
            return Err(invalid(
                path,
                format!(
                    "extended L2 entries need cluster_bits of at least \
                     {MIN_CLUSTER_BITS_EXTL2}, not {cluster_bits}"
                ),
            ));
        }
        let l1_needed = Self::l1_entries_ext(size, cluster_bits, extended_l2);
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(invalid(
                path,
                format!("l1_size {l1_size} is above the limit of {MAX_L1_BYTES} bytes"),
            ));
        }
        if u64::from(l1_size) < l1_needed {
            return Err(invalid(
                path,
                format!("l1_size {l1_size} is too small for size {size} (needs {l1_needed})"),
            ));
        }
        // qemu (qcow2_validate_table) checks the alignment even of an empty
        // L1 table, and that every table ends at or below i64::MAX.
        if !l1_table_offset.is_multiple_of(cluster_size) {
            return Err(invalid(
                path,
                format!("l1_table_offset {l1_table_offset:#x} is not cluster aligned"),
            ));
        }
        if l1_size > 0 && l1_table_offset == 0 {
            return Err(invalid(
                path,
                format!("l1_table_offset 0 with l1_size {l1_size} puts the L1 table on the header"),
            ));
        }
        if !table_ends_in_range(l1_table_offset, u64::from(l1_size) * 8) {
            return Err(invalid(
                path,
                format!(
                    "l1_table_offset {l1_table_offset:#x} with l1_size {l1_size} ends past \
                     {TABLE_END_MAX:#x}"
                ),
            ));
        }
        if !refcount_table_offset.is_multiple_of(cluster_size) {
            return Err(invalid(
                path,
                format!("refcount_table_offset {refcount_table_offset:#x} is not cluster aligned"),
            ));
        }
        if refcount_table_offset == 0 {
            return Err(invalid(
                path,
                "refcount_table_offset 0 puts the refcount table on the header".into(),
            ));
        }
        if refcount_table_clusters == 0
            || u64::from(refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES
        {
            return Err(invalid(
                path,
                format!(
                    "refcount_table_clusters {refcount_table_clusters} is outside 1..={}",
                    MAX_REFTABLE_BYTES / cluster_size
                ),
            ));
        }
        if !table_ends_in_range(
            refcount_table_offset,
            u64::from(refcount_table_clusters) * cluster_size,
        ) {
            return Err(invalid(
                path,
                format!(
                    "refcount_table_offset {refcount_table_offset:#x} with \
                     refcount_table_clusters {refcount_table_clusters} ends past \
                     {TABLE_END_MAX:#x}"
                ),
            ));
        }
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                path,
                format!("nb_snapshots {nb_snapshots} is above {MAX_SNAPSHOTS}"),
            ));
        }
        // As qemu on a normal open: aligned even when there are no snapshots.
        if !snapshots_offset.is_multiple_of(cluster_size) {
            return Err(invalid(
                path,
                format!("snapshots_offset {snapshots_offset:#x} is not cluster aligned"),
            ));
        }
        if nb_snapshots > 0 && snapshots_offset == 0 {
            return Err(invalid(
                path,
                format!(
                    "snapshots_offset 0 with nb_snapshots {nb_snapshots} puts the snapshot table \
                     on the header"
                ),
            ));
        }
        if !table_ends_in_range(
            snapshots_offset,
            u64::from(nb_snapshots) * SNAPSHOT_HEADER_LEN,
        ) {
            return Err(invalid(
                path,
                format!(
                    "snapshots_offset {snapshots_offset:#x} with nb_snapshots {nb_snapshots} ends \
                     past {TABLE_END_MAX:#x}"
                ),
            ));
        }
        if backing_file_offset > cluster_size {
            // qemu: "Invalid backing file offset", whatever the size (it
            // also bounds the extensions).
            return Err(invalid(
                path,
                format!(
                    "backing_file_offset {backing_file_offset} is past the first cluster \
                     ({cluster_size} bytes)"
                ),
            ));
        }
        // Extensions: between the header and the backing name (or the end of
        // the first cluster).
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cluster_size
        }
        .min(buf.len() as u64) as usize;
        let mut at = h.header_length as usize;
        while at + 8 <= ext_end {
            let ty = be32(buf, at);
            let len = be32(buf, at + 4);
            if ty == EXT_END {
                break;
            }
            if len > MAX_EXTENSION_LEN || at + 8 + len as usize > ext_end {
                return Err(invalid(
                    path,
                    format!(
                        "header extension {ty:#x} at {at} of length {len} does not fit before \
                         byte {ext_end}"
                    ),
                ));
            }
            let data = &buf[at + 8..at + 8 + len as usize];
            match ty {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| invalid(path, "backing format is not UTF-8".into()))?,
                    );
                }
                EXT_FEATURE_TABLE => {
                    let mut t = Vec::new();
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                        t.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&e[2..2 + name_end]).into_owned(),
                        });
                    }
                    h.feature_table = Some(t);
                }
                EXT_DATA_FILE => {
                    h.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                _ => {
                    if ty == EXT_BITMAPS {
                        h.has_bitmaps_ext = true;
                    }
                    if ty == EXT_CRYPTO {
                        h.has_crypto_ext = true;
                    }
                    h.other_extensions.push((ty, data.to_vec()));
                }
            }
            at += 8 + (len as usize).next_multiple_of(8);
        }
        // qemu reads a backing_file_size of 0 as an empty name, which means
        // no backing file: so does diskstream.
        if backing_file_offset != 0 && backing_file_size != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return Err(invalid(
                    path,
                    format!("backing_file_size {backing_file_size} is above {MAX_BACKING_NAME}"),
                ));
            }
            // A hostile offset near u64::MAX must not wrap around.
            let end = backing_file_offset.saturating_add(u64::from(backing_file_size));
            if backing_file_offset < u64::from(h.header_length)
                || end > cluster_size
                || end > buf.len() as u64
            {
                return Err(invalid(
                    path,
                    format!(
                        "backing file name at {backing_file_offset} length {backing_file_size} \
                         is not inside the first cluster"
                    ),
                ));
            }
            let name = &buf[backing_file_offset as usize..end as usize];
            h.backing_name = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| invalid(path, "backing file name is not UTF-8".into()))?,
            );
        }
        Ok(h)
    }

    /// The names of incompatible feature bits set in `bits`, from the image's
    /// feature name table (or `bit N` where it has none).
    pub fn feature_names(&self, kind: u8, bits: u64) -> Vec<String> {
        (0..64)
            .filter(|b| bits & (1u64 << b) != 0)
            .map(|b| {
                self.feature_table
                    .as_ref()
                    .and_then(|t| t.iter().find(|f| f.kind == kind && u32::from(f.bit) == b))
                    .map(|f| format!("{} (bit {b})", f.name))
                    .unwrap_or_else(|| format!("unknown feature bit {b}"))
            })
            .collect()
    }

    /// Encodes header, extensions and backing name as one buffer.
    pub fn encode(&self, path: &Path) -> Result<Vec<u8>> {
        let hlen = if self.version == 3 {
            self.header_length.max(104) as usize
        } else {
            V2_HEADER_LEN as usize
        };
        let mut b = vec![0u8; hlen];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&(hlen as u32).to_be_bytes());
            if hlen > 104 {
                b[104] = self.compression_type;
            }
        }
        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.data_file {
            push_ext(&mut b, EXT_DATA_FILE, d.as_bytes());
        }
        if let Some(t) = &self.feature_table {
            let mut data = Vec::with_capacity(t.len() * 48);
            for f in t {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                data.extend_from_slice(&e);
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &data);
        }
        for (ty, data) in &self.other_extensions {
            push_ext(&mut b, *ty, data);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_name {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::InvalidInput(format!(
                    "{}: backing file name length {} is outside 1..={MAX_BACKING_NAME}",
                    path.display(),
                    name.len()
                )));
            }
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        let limit = self.cluster_size().min(MAX_HEADER_WRITE);
        if b.len() as u64 > limit && self.feature_table.is_some() {
            // The feature name table is optional: qemu leaves it out when
            // it does not fit (512-byte clusters with a backing file).
            let without = Header {
                feature_table: None,
                ..self.clone()
            };
            return without.encode(path);
        }
        if b.len() as u64 > limit {
            return Err(Error::InvalidInput(format!(
                "{}: header, extensions and backing name take {} bytes, more than the {limit} \
                 bytes a header write may cover",
                path.display(),
                b.len()
            )));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.qcow2")
    }

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_name: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            feature_table: Some(default_feature_table()),
            data_file: None,
            has_bitmaps_ext: false,
            has_crypto_ext: false,
            other_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    fn encoded() -> Vec<u8> {
        let mut b = sample().encode(p()).unwrap();
        b.resize(65536, 0);
        b
    }

    fn expect_invalid(b: &[u8], what: &str) {
        let e = Header::decode(b, p()).unwrap_err();
        assert!(e.to_string().contains(what), "{e} should mention {what}");
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::decode(&encoded(), p()).unwrap(), h);
        let mut v2 = sample();
        v2.version = 2;
        v2.header_length = V2_HEADER_LEN;
        v2.refcount_order = 4;
        let mut b = v2.encode(p()).unwrap();
        b.resize(65536, 0);
        assert_eq!(Header::decode(&b, p()).unwrap(), v2);
    }

    #[test]
    fn header_rejects_bad_magic() {
        let mut b = encoded();
        b[0] = b'X';
        expect_invalid(&b, "magic");
    }

    #[test]
    fn header_rejects_version_4() {
        let mut b = encoded();
        b[4..8].copy_from_slice(&4u32.to_be_bytes());
        expect_invalid(&b, "version 4");
    }

    #[test]
    fn header_rejects_cluster_bits_above_21() {
        let mut b = encoded();
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        expect_invalid(&b, "cluster_bits 22");
    }

    #[test]
    fn header_rejects_cluster_bits_below_9() {
        let mut b = encoded();
        b[20..24].copy_from_slice(&8u32.to_be_bytes());
        expect_invalid(&b, "cluster_bits 8");
    }

    #[test]
    fn header_rejects_extended_l2_with_clusters_below_16k() {
        let mut h = sample();
        h.incompatible_features |= INCOMPAT_EXTL2;
        h.cluster_bits = 13;
        h.l1_size = 1 << 10;
        expect_invalid(
            &h.encode(p()).unwrap(),
            "extended L2 entries need cluster_bits",
        );
    }

    #[test]
    fn header_needs_twice_the_l1_with_extended_l2() {
        // 1 GiB with 64 KiB clusters: 2 L1 entries standard, 4 extended.
        let mut h = sample();
        h.incompatible_features |= INCOMPAT_EXTL2;
        expect_invalid(&h.encode(p()).unwrap(), "l1_size 2 is too small");
        h.l1_size = 4;
        assert!(
            Header::decode(&h.encode(p()).unwrap(), p())
                .unwrap()
                .extended_l2()
        );
    }

    #[test]
    fn header_rejects_huge_l1_size() {
        let mut b = encoded();
        b[36..40].copy_from_slice(&(5u32 << 20).to_be_bytes());
        expect_invalid(&b, "l1_size");
    }

    #[test]
    fn header_rejects_l1_too_small_for_size() {
        let mut b = encoded();
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        expect_invalid(&b, "too small");
    }

    #[test]
    fn header_rejects_unaligned_l1_offset() {
        let mut b = encoded();
        b[40..48].copy_from_slice(&0x30200u64.to_be_bytes());
        expect_invalid(&b, "l1_table_offset");
    }

    #[test]
    fn header_rejects_unaligned_refcount_table() {
        let mut b = encoded();
        b[48..56].copy_from_slice(&0x10001u64.to_be_bytes());
        expect_invalid(&b, "refcount_table_offset");
    }

    #[test]
    fn header_rejects_huge_refcount_table() {
        let mut b = encoded();
        b[56..60].copy_from_slice(&1000u32.to_be_bytes());
        expect_invalid(&b, "refcount_table_clusters");
    }

    #[test]
    fn header_rejects_too_many_snapshots() {
        let mut b = encoded();
        b[60..64].copy_from_slice(&(MAX_SNAPSHOTS + 1).to_be_bytes());
        expect_invalid(&b, "nb_snapshots");
    }

    #[test]
    fn header_rejects_refcount_order_above_6() {
        let mut b = encoded();
        b[96..100].copy_from_slice(&7u32.to_be_bytes());
        expect_invalid(&b, "refcount_order 7");
    }

    #[test]
    fn header_rejects_short_header_length() {
        let mut b = encoded();
        b[100..104].copy_from_slice(&100u32.to_be_bytes());
        expect_invalid(&b, "header_length 100");
    }

    #[test]
    fn header_rejects_size_above_2_62() {
        let mut b = encoded();
        b[24..32].copy_from_slice(&(u64::MAX).to_be_bytes());
        expect_invalid(&b, "size");
    }

    #[test]
    fn header_rejects_backing_name_outside_first_cluster() {
        let mut b = encoded();
        b[8..16].copy_from_slice(&65530u64.to_be_bytes());
        expect_invalid(&b, "backing file name");
    }

    #[test]
    fn header_rejects_overlong_backing_name() {
        let mut b = encoded();
        b[16..20].copy_from_slice(&2000u32.to_be_bytes());
        expect_invalid(&b, "backing_file_size 2000");
    }

    #[test]
    fn header_rejects_extension_past_end() {
        let mut b = encoded();
        let at = V3_HEADER_LEN as usize + 4;
        b[at..at + 4].copy_from_slice(&60000u32.to_be_bytes());
        expect_invalid(&b, "header extension");
    }

    #[test]
    fn encode_refuses_header_over_4k() {
        let mut h = sample();
        h.other_extensions.push((0x1111, vec![0; 4000]));
        assert!(h.encode(p()).is_err());
    }

    #[test]
    fn encode_drops_the_feature_table_when_it_does_not_fit() {
        let mut h = sample();
        h.cluster_bits = 9;
        h.l1_size = 1 << 15;
        let b = h.encode(p()).unwrap();
        assert!(b.len() <= 512);
        let mut b512 = b.clone();
        b512.resize(512, 0);
        let d = Header::decode(&b512, p()).unwrap();
        assert_eq!(d.feature_table, None);
        assert_eq!(d.backing_name.as_deref(), Some("base.raw"));
        assert_eq!(d.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn feature_names_come_from_the_table() {
        let h = sample();
        assert_eq!(
            h.feature_names(0, INCOMPAT_EXTL2 | (1 << 9)),
            vec![
                "extended L2 entries (bit 4)".to_string(),
                "unknown feature bit 9".to_string()
            ]
        );
    }

    // ---- Limits: a round trip exactly at each limit, and one rejection
    // just past it, whose message names the field. ----

    /// Encodes `h` with the crate's writer, pads it to one cluster (as the
    /// engine reads it), decodes it and checks every field came back.
    fn round_trip(h: &Header) -> Vec<u8> {
        let mut b = h.encode(p()).unwrap();
        b.resize(h.cluster_size() as usize, 0);
        assert_eq!(Header::decode(&b, p()).unwrap(), *h);
        b
    }

    /// `sample()` with the given cluster size: table offsets moved to
    /// multiples of it and the L1 table sized for `size`.
    fn sample_with_cluster_bits(cluster_bits: u32) -> Header {
        let cs = 1u64 << cluster_bits;
        let mut h = sample();
        h.cluster_bits = cluster_bits;
        h.refcount_table_offset = cs;
        h.l1_table_offset = 2 * cs;
        h.l1_size = Header::l1_entries_for(h.size, cluster_bits) as u32;
        h
    }

    #[test]
    fn header_round_trips_a_backing_name_of_max_backing_name_bytes() {
        let mut h = sample();
        h.backing_name = Some("b".repeat(MAX_BACKING_NAME as usize));
        let b = round_trip(&h);
        assert_eq!(be32(&b, 16), MAX_BACKING_NAME);
    }

    #[test]
    fn header_rejects_backing_file_size_one_past_max_backing_name() {
        let mut b = encoded();
        b[16..20].copy_from_slice(&(MAX_BACKING_NAME + 1).to_be_bytes());
        expect_invalid(&b, "backing_file_size 1024 is above 1023");
    }

    #[test]
    fn encode_refuses_a_backing_name_one_past_max_backing_name() {
        let mut h = sample();
        h.backing_name = Some("b".repeat(MAX_BACKING_NAME as usize + 1));
        let e = h.encode(p()).unwrap_err().to_string();
        assert!(e.contains("backing file name length 1024"), "{e}");
    }

    #[test]
    fn encode_refuses_an_empty_backing_name() {
        let mut h = sample();
        h.backing_name = Some(String::new());
        let e = h.encode(p()).unwrap_err().to_string();
        assert!(e.contains("backing file name length 0"), "{e}");
    }

    /// qemu reads a backing_file_size of 0 as an empty name, which it takes
    /// as no backing file; diskstream does the same instead of refusing.
    #[test]
    fn header_reads_backing_file_size_0_as_no_backing_file() {
        let mut b = encoded();
        b[16..20].copy_from_slice(&0u32.to_be_bytes());
        assert_ne!(be64(&b, 8), 0);
        let d = Header::decode(&b, p()).unwrap();
        let mut want = sample();
        want.backing_name = None;
        assert_eq!(d, want);
        // Written back without a backing file.
        assert_eq!(be64(&d.encode(p()).unwrap(), 8), 0);
    }

    #[test]
    fn header_rejects_backing_file_offset_past_the_first_cluster() {
        // With a size of 0 as well: qemu refuses the offset before it
        // looks at the size.
        for size in [0u32, 8] {
            let mut b = encoded();
            b[8..16].copy_from_slice(&65537u64.to_be_bytes());
            b[16..20].copy_from_slice(&size.to_be_bytes());
            expect_invalid(&b, "backing_file_offset 65537 is past the first cluster");
        }
    }

    #[test]
    fn header_rejects_a_backing_file_name_that_is_not_utf8() {
        let mut b = encoded();
        let at = be64(&b, 8) as usize;
        b[at] = 0xff;
        expect_invalid(&b, "backing file name is not UTF-8");
    }

    #[test]
    fn header_rejects_a_backing_format_that_is_not_utf8() {
        let mut b = encoded();
        // The backing format extension comes first: type, length, "raw".
        let at = V3_HEADER_LEN as usize;
        assert_eq!(be32(&b, at), EXT_BACKING_FORMAT);
        b[at + 8] = 0xff;
        expect_invalid(&b, "backing format is not UTF-8");
    }

    /// The largest virtual size the parser accepts: the L1 limit bounds it
    /// below the 2^62 size limit (2 MiB clusters, 2^22 L1 entries, 2^18 L2
    /// entries: 2^61 bytes).
    #[test]
    fn header_round_trips_the_largest_virtual_size() {
        let mut h = sample_with_cluster_bits(MAX_CLUSTER_BITS);
        h.l1_size = (MAX_L1_BYTES / 8) as u32;
        h.size = 1 << 61;
        assert_eq!(Header::l1_entries_for(h.size, h.cluster_bits), 1 << 22);
        round_trip(&h);
    }

    #[test]
    fn header_rejects_size_one_byte_past_the_largest_l1() {
        let mut h = sample_with_cluster_bits(MAX_CLUSTER_BITS);
        h.l1_size = (MAX_L1_BYTES / 8) as u32;
        h.size = (1 << 61) + 1;
        let mut b = h.encode(p()).unwrap();
        b.resize(h.cluster_size() as usize, 0);
        expect_invalid(
            &b,
            "l1_size 4194304 is too small for size 2305843009213693953",
        );
    }

    #[test]
    fn header_rejects_size_one_past_2_62() {
        let mut b = encoded();
        b[24..32].copy_from_slice(&((1u64 << 62) + 1).to_be_bytes());
        expect_invalid(&b, "size 4611686018427387905 is above 2^62");
    }

    #[test]
    fn header_round_trips_max_l1_size() {
        let mut h = sample();
        h.l1_size = (MAX_L1_BYTES / 8) as u32;
        round_trip(&h);
    }

    #[test]
    fn header_rejects_l1_size_one_past_the_limit() {
        let mut b = encoded();
        b[36..40].copy_from_slice(&((MAX_L1_BYTES / 8) as u32 + 1).to_be_bytes());
        expect_invalid(&b, "l1_size 4194305 is above the limit");
    }

    #[test]
    fn header_round_trips_max_nb_snapshots() {
        let mut h = sample();
        h.nb_snapshots = MAX_SNAPSHOTS;
        h.snapshots_offset = 0x40000;
        round_trip(&h);
    }

    #[test]
    fn header_round_trips_the_smallest_and_largest_cluster_bits() {
        for cluster_bits in [MIN_CLUSTER_BITS, MAX_CLUSTER_BITS] {
            let mut h = sample_with_cluster_bits(cluster_bits);
            // A 512-byte cluster has no room for the feature name table
            // next to the backing name (the writer would drop it).
            h.feature_table = None;
            round_trip(&h);
        }
    }

    #[test]
    fn header_round_trips_extended_l2_at_the_smallest_cluster_bits() {
        let mut h = sample_with_cluster_bits(MIN_CLUSTER_BITS_EXTL2);
        h.incompatible_features |= INCOMPAT_EXTL2;
        h.l1_size = Header::l1_entries_ext(h.size, h.cluster_bits, true) as u32;
        round_trip(&h);
    }

    #[test]
    fn header_round_trips_every_refcount_order() {
        for order in 0..=6 {
            let mut h = sample();
            h.refcount_order = order;
            round_trip(&h);
        }
    }

    #[test]
    fn header_round_trips_max_refcount_table_clusters_for_every_cluster_size() {
        for cluster_bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
            let mut h = sample_with_cluster_bits(cluster_bits);
            h.feature_table = None;
            h.refcount_table_clusters = (MAX_REFTABLE_BYTES >> cluster_bits) as u32;
            // The L1 table after the refcount table.
            h.l1_table_offset =
                h.refcount_table_offset + u64::from(h.refcount_table_clusters) * h.cluster_size();
            round_trip(&h);
        }
    }

    #[test]
    fn header_rejects_refcount_table_clusters_one_past_the_limit() {
        let mut b = encoded();
        b[56..60].copy_from_slice(&129u32.to_be_bytes());
        expect_invalid(&b, "refcount_table_clusters 129 is outside 1..=128");
    }

    #[test]
    fn header_rejects_refcount_table_clusters_0() {
        // qemu: "Image does not contain a reference count table".
        let mut b = encoded();
        b[56..60].copy_from_slice(&0u32.to_be_bytes());
        expect_invalid(&b, "refcount_table_clusters 0 is outside 1..=128");
    }

    #[test]
    fn header_rejects_refcount_table_offset_0() {
        let mut b = encoded();
        b[48..56].copy_from_slice(&0u64.to_be_bytes());
        expect_invalid(
            &b,
            "refcount_table_offset 0 puts the refcount table on the header",
        );
    }

    #[test]
    fn header_round_trips_the_last_refcount_table_offset() {
        // The table's last byte at or below i64::MAX (qemu's bound).
        let mut h = sample();
        h.refcount_table_offset = (1 << 63) - 2 * 65536;
        round_trip(&h);
    }

    #[test]
    fn header_rejects_refcount_table_offset_ending_past_i64_max() {
        let mut b = encoded();
        b[48..56].copy_from_slice(&((1u64 << 63) - 65536).to_be_bytes());
        expect_invalid(&b, "refcount_table_offset 0x7fffffffffff0000 with");
    }

    #[test]
    fn header_rejects_l1_table_offset_0_with_l1_size_above_0() {
        let mut b = encoded();
        b[40..48].copy_from_slice(&0u64.to_be_bytes());
        expect_invalid(&b, "l1_table_offset 0 with l1_size 2");
    }

    #[test]
    fn header_round_trips_an_empty_l1_table_at_offset_0() {
        let mut h = sample();
        h.size = 0;
        h.l1_size = 0;
        h.l1_table_offset = 0;
        round_trip(&h);
    }

    #[test]
    fn header_rejects_l1_table_offset_unaligned_with_l1_size_0() {
        // qemu checks the alignment of an empty L1 table too.
        let mut b = encoded();
        b[24..32].copy_from_slice(&0u64.to_be_bytes());
        b[36..40].copy_from_slice(&0u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30200u64.to_be_bytes());
        expect_invalid(&b, "l1_table_offset 0x30200 is not cluster aligned");
    }

    #[test]
    fn header_round_trips_the_last_l1_table_offset() {
        // 8191 entries end 8 bytes below 2^63.
        let mut h = sample();
        h.l1_table_offset = (1 << 63) - 65536;
        h.l1_size = 8191;
        round_trip(&h);
    }

    #[test]
    fn header_rejects_l1_table_offset_ending_past_i64_max() {
        let mut b = encoded();
        b[36..40].copy_from_slice(&8192u32.to_be_bytes());
        b[40..48].copy_from_slice(&((1u64 << 63) - 65536).to_be_bytes());
        expect_invalid(
            &b,
            "l1_table_offset 0x7fffffffffff0000 with l1_size 8192 ends past",
        );
    }

    #[test]
    fn header_rejects_snapshots_offset_unaligned() {
        let mut b = encoded();
        b[60..64].copy_from_slice(&1u32.to_be_bytes());
        b[64..72].copy_from_slice(&0x40200u64.to_be_bytes());
        expect_invalid(&b, "snapshots_offset 0x40200 is not cluster aligned");
    }

    #[test]
    fn header_rejects_snapshots_offset_unaligned_with_nb_snapshots_0() {
        // As qemu on a normal open (qcow2_validate_table).
        let mut b = encoded();
        b[64..72].copy_from_slice(&0x40200u64.to_be_bytes());
        expect_invalid(&b, "snapshots_offset 0x40200 is not cluster aligned");
    }

    #[test]
    fn header_rejects_snapshots_offset_0_with_nb_snapshots_above_0() {
        let mut b = encoded();
        b[60..64].copy_from_slice(&1u32.to_be_bytes());
        expect_invalid(&b, "snapshots_offset 0 with nb_snapshots 1");
    }

    #[test]
    fn header_round_trips_the_last_snapshots_offset() {
        // 1638 entries of 40 bytes end 16 bytes below 2^63.
        let mut h = sample();
        h.snapshots_offset = (1 << 63) - 65536;
        h.nb_snapshots = 1638;
        round_trip(&h);
    }

    #[test]
    fn header_rejects_snapshots_offset_ending_past_i64_max() {
        let mut b = encoded();
        b[60..64].copy_from_slice(&1639u32.to_be_bytes());
        b[64..72].copy_from_slice(&((1u64 << 63) - 65536).to_be_bytes());
        expect_invalid(
            &b,
            "snapshots_offset 0x7fffffffffff0000 with nb_snapshots 1639 ends past",
        );
    }

    #[test]
    fn header_rejects_version_1() {
        let mut b = encoded();
        b[4..8].copy_from_slice(&1u32.to_be_bytes());
        expect_invalid(&b, "version 1");
    }

    #[test]
    fn header_rejects_a_v3_header_truncated_below_104_bytes() {
        let b = encoded();
        expect_invalid(&b[..103], "version 3 header is truncated");
    }

    #[test]
    fn header_rejects_a_buffer_shorter_than_the_v2_header() {
        // Reported as not a qcow2 image (the magic check covers the length).
        let b = encoded();
        expect_invalid(&b[..V2_HEADER_LEN as usize - 1], "magic");
    }

    #[test]
    fn header_rejects_header_length_103() {
        let mut b = encoded();
        b[100..104].copy_from_slice(&103u32.to_be_bytes());
        expect_invalid(&b, "header_length 103 is below 104");
    }

    /// At 104 bytes there is no compression type field: byte 104 is the
    /// first extension's type and must not be read as one.
    #[test]
    fn header_round_trips_header_length_104() {
        let mut h = sample();
        h.header_length = 104;
        let b = round_trip(&h);
        assert_eq!(b[104], (EXT_BACKING_FORMAT >> 24) as u8);
    }

    #[test]
    fn header_round_trips_header_length_equal_to_the_cluster_size() {
        // The writer always ends the extensions with 8 zero bytes, so it
        // fills a 512-byte cluster with a 504-byte header; those bytes then
        // become the header's last ones.
        let mut h = sample_with_cluster_bits(MIN_CLUSTER_BITS);
        h.header_length = 504;
        h.backing_name = None;
        h.backing_format = None;
        h.feature_table = None;
        h.other_extensions.clear();
        let mut b = h.encode(p()).unwrap();
        assert_eq!(b.len(), 512);
        b[100..104].copy_from_slice(&512u32.to_be_bytes());
        h.header_length = 512;
        assert_eq!(Header::decode(&b, p()).unwrap(), h);
    }

    #[test]
    fn header_rejects_header_length_one_past_the_cluster_size() {
        let mut b = encoded();
        b[100..104].copy_from_slice(&65537u32.to_be_bytes());
        expect_invalid(&b, "header_length 65537 exceeds the cluster size 65536");
    }

    /// The extension limit on its own: a 2 MiB cluster without a backing
    /// name has room for the payload, so only MAX_EXTENSION_LEN refuses it.
    /// (The writer keeps header writes within 4 KiB, so these are built by
    /// hand after the writer's fixed header.)
    fn with_one_extension(len: u32) -> (Header, Vec<u8>) {
        let mut h = sample_with_cluster_bits(MAX_CLUSTER_BITS);
        h.backing_name = None;
        h.backing_format = None;
        h.feature_table = None;
        h.other_extensions.clear();
        let mut b = h.encode(p()).unwrap();
        b.truncate(V3_HEADER_LEN as usize);
        b.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend(std::iter::repeat_n(0xa5, len as usize));
        b.resize(h.cluster_size() as usize, 0);
        h.other_extensions = vec![(0x1234_5678, vec![0xa5; len as usize])];
        (h, b)
    }

    #[test]
    fn header_reads_an_extension_of_max_extension_len() {
        let (h, b) = with_one_extension(MAX_EXTENSION_LEN);
        assert_eq!(Header::decode(&b, p()).unwrap(), h);
    }

    #[test]
    fn header_rejects_an_extension_one_past_max_extension_len() {
        let (_, b) = with_one_extension(MAX_EXTENSION_LEN + 1);
        expect_invalid(&b, "header extension 0x12345678 at 112 of length 65537");
    }

    #[test]
    fn header_round_trips_zstd_with_the_compression_type_bit() {
        let mut h = sample();
        h.compression_type = COMPRESSION_ZSTD;
        h.incompatible_features |= INCOMPAT_COMPRESSION;
        round_trip(&h);
        check_compression_type(&h, p()).unwrap();
    }

    #[test]
    fn compression_type_zlib_with_the_compression_type_bit_is_refused() {
        let mut h = sample();
        h.incompatible_features |= INCOMPAT_COMPRESSION;
        let e = check_compression_type(&h, p()).unwrap_err().to_string();
        assert!(e.contains("compression_type is 0"), "{e}");
    }

    #[test]
    fn compression_type_zstd_without_the_compression_type_bit_is_refused() {
        let mut h = sample();
        h.compression_type = COMPRESSION_ZSTD;
        let e = check_compression_type(&h, p()).unwrap_err().to_string();
        assert!(e.contains("compression_type 1"), "{e}");
    }

    #[test]
    fn compression_type_2_is_unsupported() {
        let mut h = sample();
        h.compression_type = 2;
        h.incompatible_features |= INCOMPAT_COMPRESSION;
        let e = check_compression_type(&h, p()).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("compression_type 2"), "{e}");
    }
}
