//! The identity of a remote backing, recorded when an overlay is created on it.
//!
//! An overlay must never mix two versions of its base (DESIGN.md invariant 5).
//! When an overlay is created on a remote backing (NBD, HTTP), what the
//! backing said about itself is recorded: its size, for HTTP the `ETag` and
//! `Last-Modified` it served, for NBD its transmission flags and a checksum
//! of a few fixed, spread-out sample ranges of its data. The backing's
//! opener checks it on open and after every reconnect, and a change fails
//! remote reads with an error naming the change.
//!
//! Where it is kept: in qcow2, a header extension of type
//! [`crate::qcow2::header::EXT_BACKING_IDENTITY`] whose payload is this
//! struct as JSON. QEMU keeps header extensions it does not know (it reads
//! them into its list of unknown extensions and writes them back on every
//! header update; checked with `qemu-img amend`, `check -r all` and
//! `rebase -u` in the tests), so the record survives QEMU touching the
//! image. Formats with no such place (QED) keep the same JSON in a file
//! beside the image, [`sidecar_path`] (`IMAGE.backing-id`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::BlockDevice;
use crate::{Error, Result};

/// Bytes read per sample range, and how many ranges (spread over the device).
pub const SAMPLE_LEN: u64 = 4096;
pub const SAMPLE_COUNT: u64 = 8;

/// What a remote backing was when the overlay was created on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingIdentity {
    /// Virtual size in bytes.
    pub size: u64,
    /// HTTP `ETag` as served (quotes and `W/` included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// HTTP `Last-Modified` as served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// NBD transmission flags the server offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_flags: Option<u16>,
    /// `fnv1a64:HEX` over the [`sample_ranges`] of the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
}

impl BackingIdentity {
    /// The differences from `recorded` (self) to `now`, for an error message:
    /// `ETag "a" → "b"`. Fields `recorded` does not hold are not compared;
    /// empty when nothing changed.
    pub fn changes(&self, now: &BackingIdentity) -> Vec<String> {
        let mut out = Vec::new();
        if self.size != now.size {
            out.push(format!("size {} → {}", self.size, now.size));
        }
        let mut text = |what: &str, a: &Option<String>, b: &Option<String>| {
            if let Some(a) = a
                && Some(a) != b.as_ref()
            {
                out.push(format!("{what} {a} → {}", b.as_deref().unwrap_or("(none)")));
            }
        };
        text("ETag", &self.etag, &now.etag);
        // Last-Modified is only compared when there is no ETag: a server may
        // serve the same bytes under a new date (a copy), and the ETag is the
        // stronger validator when both exist.
        if self.etag.is_none() {
            text("Last-Modified", &self.last_modified, &now.last_modified);
        }
        text("data sample", &self.sample, &now.sample);
        if let Some(a) = self.nbd_flags
            && Some(a) != now.nbd_flags
        {
            out.push(format!(
                "NBD flags {a:#x} → {}",
                now.nbd_flags.map_or("(none)".into(), |b| format!("{b:#x}"))
            ));
        }
        out
    }

    /// Checks `now` against this record: `Err` names the backing and the change.
    pub fn check(&self, name: &str, now: &BackingIdentity) -> Result<()> {
        let changes = self.changes(now);
        if changes.is_empty() {
            return Ok(());
        }
        Err(Error::Remote(format!(
            "backing {name} changed: {}; refusing to read from it (the overlay was \
             created on another version of it)",
            changes.join(", ")
        )))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("identity serialises")
    }

    pub fn from_json(what: &str, data: &[u8]) -> Result<Self> {
        serde_json::from_slice(data).map_err(|e| {
            Error::InvalidInput(format!("{what}: invalid backing identity record: {e}"))
        })
    }
}

/// The fixed sample ranges of a device of `size` bytes: [`SAMPLE_COUNT`]
/// ranges of up to [`SAMPLE_LEN`] bytes, the first at 0, the last ending at
/// the end, the rest evenly spread between.
pub fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    if size == 0 {
        return Vec::new();
    }
    let len = SAMPLE_LEN.min(size);
    let span = size - len;
    let mut out: Vec<(u64, u64)> = (0..SAMPLE_COUNT)
        .map(|i| ((span / (SAMPLE_COUNT - 1)) * i / 512 * 512, len))
        .collect();
    if let Some(last) = out.last_mut() {
        last.0 = span;
    }
    out.dedup();
    out
}

/// FNV-1a (64 bit) over the sample ranges, printed as `fnv1a64:HEX`. Not a
/// cryptographic hash: it detects a base replaced by another version, not an
/// attacker (the transport's TLS is what protects against those).
#[derive(Clone, Copy, Debug)]
pub struct SampleHasher(u64);

impl Default for SampleHasher {
    fn default() -> Self {
        SampleHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl SampleHasher {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// The sample checksum of `dev` (see [`SampleHasher`], [`sample_ranges`]).
pub async fn sample_checksum(dev: &dyn BlockDevice) -> Result<String> {
    let mut h = SampleHasher::default();
    for (off, len) in sample_ranges(dev.size()) {
        h.update(&dev.read(off, len as usize).await?);
    }
    Ok(h.finish())
}

/// Where the identity of `image`'s backing is kept for formats without a
/// header extension: `IMAGE.backing-id` beside it.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".backing-id");
    PathBuf::from(s)
}

/// Reads the sidecar record of `image`, `None` when there is none.
pub fn read_sidecar(image: &Path) -> Result<Option<BackingIdentity>> {
    let p = sidecar_path(image);
    match std::fs::read(&p) {
        Ok(data) => BackingIdentity::from_json(&p.display().to_string(), &data).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(p, "read backing identity", e)),
    }
}

/// Writes the sidecar record of `image` (write to a temporary name, then
/// rename, so a crash leaves the old record or the new one).
pub fn write_sidecar(image: &Path, id: &BackingIdentity) -> Result<()> {
    let p = sidecar_path(image);
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, id.to_json()).map_err(|e| Error::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, "rename", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_ranges_cover_both_ends_and_stay_inside() {
        let r = sample_ranges(10 << 20);
        assert_eq!(r.len(), SAMPLE_COUNT as usize);
        assert_eq!(r[0], (0, SAMPLE_LEN));
        assert_eq!(r.last().unwrap().0 + SAMPLE_LEN, 10 << 20);
        assert!(r.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(sample_ranges(100), vec![(0, 100)]);
        assert!(sample_ranges(0).is_empty());
    }

    #[test]
    fn changes_name_the_field() {
        let a = BackingIdentity {
            size: 1,
            etag: Some("\"a\"".into()),
            last_modified: Some("x".into()),
            ..Default::default()
        };
        let b = BackingIdentity {
            etag: Some("\"b\"".into()),
            last_modified: Some("y".into()),
            ..a.clone()
        };
        assert_eq!(a.changes(&b), vec!["ETag \"a\" → \"b\"".to_string()]);
        let e = a.check("http://h/base.raw", &b).unwrap_err().to_string();
        assert!(
            e.contains("backing http://h/base.raw changed: ETag \"a\" → \"b\""),
            "{e}"
        );
        assert!(a.check("x", &a).is_ok());
        let json = a.to_json();
        assert_eq!(BackingIdentity::from_json("t", &json).unwrap(), a);
    }
}
