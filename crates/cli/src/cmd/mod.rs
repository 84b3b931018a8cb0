//! The subcommands, one module each, plus what several of them share:
//! output format selection, qemu-img compatible size parsing, error naming,
//! and a walk down a backing chain that opens each layer on its own.
//!
//! The one decision to know: every error that leaves a command names the
//! file it is about. Library errors usually do already; [`file_error`] adds
//! the path where one does not, so the user always sees
//! `diskstream: <file>: <problem>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::open::{
    BackingChoice, OpenOptions, Opener, backing_format, is_uri, resolve_backing_path,
};
use image::{FormatKind, Image};

pub mod check;
pub mod convert;
pub mod create;
pub mod daemon;
pub mod demo;
pub mod deploy;
pub mod info;
pub mod job;
pub mod map;
pub mod migrate;
pub mod nbd_tls;
pub mod policy;
pub mod progress;
pub mod pull;
pub mod pull_step;
pub mod qmp;
pub mod serve;
pub mod session;
pub mod source;
pub mod stream;

/// `--output` of the reporting commands, as qemu-img's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON shaped like qemu-img's.
    Json,
}

/// The image arguments of the commands that inspect one image.
#[derive(Debug, clap::Args)]
pub struct ImageArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Open even if another process writes the image (its content may be
    /// inconsistent while you read it; not with check -r).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Format of IMAGE (default: probed; backings are never probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// The image.
    pub image: PathBuf,
}

/// An image error as the user sees it: prefixed by `path` unless the
/// message already names it.
pub fn file_error(path: &Path, e: image::Error) -> anyhow::Error {
    let msg = e.to_string();
    let shown = path.display().to_string();
    if msg.contains(&shown) {
        anyhow::Error::new(e)
    } else {
        anyhow::anyhow!("{shown}: {msg}")
    }
}

/// Parses a size like qemu-img: a number (with an optional decimal
/// fraction when a unit follows) and an optional case-insensitive suffix
/// `B`, `K`, `M`, `G`, `T`, `P`, `E` (powers of 1024). Fails on anything
/// else and on sizes of 2^63 bytes or more (qemu-img's limit).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size '{s}' (expected a number of bytes with an optional K, M, G, T, P or E suffix)"
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(bad()),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    if !frac.is_empty() && shift == 0 {
        return Err(format!(
            "invalid size '{s}': a fraction needs a unit suffix"
        ));
    }
    let too_big = || format!("invalid size '{s}': image size must be less than 8 EiB");
    let int: u128 = int.parse().map_err(|_| too_big())?;
    let mut bytes = int
        .checked_shl(shift)
        .filter(|v| *v >> shift == int)
        .ok_or_else(too_big)?;
    if !frac.is_empty() {
        // Exact decimal fraction of the unit, rounded down like qemu's.
        let digits = frac.len().min(18) as u32;
        let f: u128 = frac[..digits as usize].parse().map_err(|_| bad())?;
        bytes += (f << shift) / 10u128.pow(digits);
    }
    if bytes >= 1 << 63 {
        return Err(too_big());
    }
    Ok(bytes as u64)
}

/// One image of a backing chain, opened on its own.
#[derive(Debug)]
pub struct Layer {
    /// The name QEMU shows for it: the top image as given, below that the
    /// backing name resolved against the directory of the image above.
    pub filename: String,
    pub image: Arc<Image>,
}

/// Opens `path` and each image below it without their backings (every
/// layer read-only, the backing format taken from the header; a URI
/// backing ends the walk since the CLI has no network opener). A backing
/// the library would not open (a `json:` name, no recorded format) is
/// refused with the library's own check and message: opening the name as
/// a path would misreport a `json:` name as a missing file, and opening
/// without a format would probe the backing, which diskstream never does.
pub async fn walk_chain(
    path: &Path,
    format: Option<String>,
    force_share: bool,
) -> anyhow::Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut cur: PathBuf = path.to_owned();
    let mut fmt = format;
    loop {
        let opts = OpenOptions {
            force_share,
            format: fmt.clone(),
            backing: BackingChoice::None,
            ..OpenOptions::default()
        };
        let image = image::open(&cur, &opts)
            .await
            .map_err(|e| file_error(&cur, e))?;
        let spec = image.backing_spec();
        let kind =
            FormatKind::parse(image.format().format_name()).map_err(|e| file_error(&cur, e))?;
        layers.push(Layer {
            filename: cur.display().to_string(),
            image,
        });
        let Some(spec) = spec else { break };
        if layers.len() >= image::open::MAX_CHAIN_DEPTH as usize {
            break;
        }
        let backing_fmt = backing_format(&cur, kind, &spec)
            .await
            .map_err(|e| file_error(&cur, e))?;
        if is_uri(&spec.name) {
            break;
        }
        cur = resolve_backing_path(&cur, &spec.name);
        fmt = Some(backing_fmt);
    }
    Ok(layers)
}

/// What opens the backings that are not local files (`nbd://`,
/// `nbd+unix://`, `http(s)://`): the daemon's opener, so every command that
/// opens a chain opens the same names.
pub fn network_opener() -> Arc<dyn Opener> {
    ::daemon::core::remote_opener_with(nbd_tls::client_options())
}

/// Opens an image with its whole backing chain, read-only.
pub async fn open_chain(
    path: &Path,
    format: Option<String>,
    force_share: bool,
) -> anyhow::Result<Arc<Image>> {
    let opts = OpenOptions {
        force_share,
        format,
        opener: Some(network_opener()),
        ..OpenOptions::default()
    };
    image::open(path, &opts)
        .await
        .map_err(|e| file_error(path, e))
}

/// Bytes the file occupies on disk (`actual-size` in qemu-img: allocated blocks).
pub fn actual_size(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m =
        std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{}: stat: {e}", path.display()))?;
    Ok(m.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512b"), Ok(512));
    }

    #[test]
    fn malformed_and_overflowing_sizes_are_refused() {
        for s in [
            "",
            "G",
            "1X",
            "-1",
            "1.5",
            "1..5G",
            "0x10",
            "1 G G",
            "8E",
            "99999999999999999999999",
            "16777216T",
        ] {
            assert!(parse_size(s).is_err(), "{s} accepted");
        }
    }
}
