//! `diskstream create`: make a new qcow2 or raw image, optionally over a
//! backing file, like `qemu-img create`.
//!
//! Everything that can be wrong with the request is checked before the file
//! is touched: the format, the size, the options, and the backing (it must
//! open, with its whole chain, in the named format, and must not be the new
//! image itself). An existing file is only replaced after taking the locks
//! qemu-img takes for a create, so an image another process has open is never
//! truncated.

use std::path::PathBuf;
use std::process::ExitCode;

use image::open::{OpenOptions, is_uri, resolve_backing_path};
use image::{BackingSpec, BlockDevice, CreateOptions, FormatKind};

use super::{file_error, open_chain, parse_size};

/// Create a new disk image.
///
/// The size takes qemu-img's suffixes (K, M, G, T, P, E: powers of 1024;
/// plain numbers are bytes). With a backing file the size may be left out:
/// the new image then gets the backing's size. An existing file at IMAGE is
/// overwritten, as qemu-img does, unless another process has it open.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image format to create: qcow2 or raw.
    #[arg(short = 'f', long = "format", default_value = "raw")]
    format: String,
    /// Backing file of the new image (qcow2 only); relative names are
    /// relative to the directory of IMAGE, as in QEMU.
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file (required with -b; never probed).
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Format options, comma separated: cluster_size=N (qcow2; a power of
    /// two from 512 bytes to 2 MiB, suffixes allowed).
    #[arg(short = 'o', long = "options")]
    options: Option<String>,
    /// Do not print the "Formatting ..." line.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Cache mode for writing the new image: writeback (page cache) or
    /// none (O_DIRECT).
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: image::CacheMode,
    /// Path of the image to create.
    image: PathBuf,
    /// Virtual size, e.g. 10G; optional with a backing file.
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// Parsed `-o` options.
#[derive(Debug, Default)]
pub struct FormatOptions {
    pub cluster_size: Option<u64>,
}

/// Parses `-o key=value[,key=value...]`.
pub fn parse_options(s: Option<&str>, image: &std::path::Path) -> anyhow::Result<FormatOptions> {
    let mut o = FormatOptions::default();
    let Some(s) = s else { return Ok(o) };
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            anyhow::anyhow!(
                "{}: invalid option '{item}' (expected key=value)",
                image.display()
            )
        })?;
        match k {
            "cluster_size" => {
                let n = parse_size(v)
                    .map_err(|e| anyhow::anyhow!("{}: cluster_size: {e}", image.display()))?;
                if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
                    anyhow::bail!(
                        "{}: cluster_size {n} must be a power of two between 512 and 2097152",
                        image.display()
                    );
                }
                o.cluster_size = Some(n);
            }
            _ => anyhow::bail!(
                "{}: unknown option '{k}' (known: cluster_size)",
                image.display()
            ),
        }
    }
    Ok(o)
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let path = &a.image;
    let kind = FormatKind::parse(&a.format).map_err(|e| file_error(path, e))?;
    let size = match &a.size {
        Some(s) => Some(parse_size(s).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?),
        None => None,
    };
    let fo = parse_options(a.options.as_deref(), path)?;
    if fo.cluster_size.is_some() && kind != FormatKind::Qcow2 {
        anyhow::bail!("{}: cluster_size is a qcow2 option", path.display());
    }
    if a.backing_format.is_some() && a.backing.is_none() {
        anyhow::bail!("{}: -F needs a backing file (-b)", path.display());
    }
    let backing = match &a.backing {
        None => None,
        Some(name) => {
            if kind != FormatKind::Qcow2 {
                anyhow::bail!(
                    "{}: {} images cannot have a backing file",
                    path.display(),
                    kind.name()
                );
            }
            let Some(bfmt) = a.backing_format.clone() else {
                anyhow::bail!(
                    "{}: the backing format must be given with -F (diskstream never probes a backing)",
                    path.display()
                );
            };
            FormatKind::parse(&bfmt)
                .map_err(|e| anyhow::anyhow!("{}: backing file {name}: {e}", path.display()))?;
            Some(BackingSpec {
                name: name.clone(),
                format: Some(bfmt),
            })
        }
    };
    let mut size = size;
    let mut identity = None;
    if let Some(spec) = &backing {
        if is_uri(&spec.name) {
            // A remote backing (nbd://, http(s)://) is opened now, as
            // qemu-img create does, for its size and to record its identity
            // (size, ETag/Last-Modified or NBD flags and a data sample), which
            // every later open and reconnect checks.
            let opener = super::remote_opener();
            let bfail = |e: image::Error| {
                anyhow::anyhow!("{}: backing file {}: {e}", path.display(), spec.name)
            };
            let dev = opener
                .open_backing(&spec.name, spec.format.as_deref(), &OpenOptions::default())
                .await
                .map_err(bfail)?;
            match dev {
                Some(dev) => {
                    if size.is_none() {
                        size = Some(dev.size());
                    }
                    drop(dev);
                    identity = opener
                        .identify(&spec.name, spec.format.as_deref())
                        .await
                        .map_err(bfail)?;
                }
                None if size.is_none() => {
                    anyhow::bail!(
                        "{}: give the size: the backing {} is not a local file",
                        path.display(),
                        spec.name
                    );
                }
                None => {}
            }
        } else {
            let bpath = resolve_backing_path(path, &spec.name);
            if same_file(path, &bpath) {
                anyhow::bail!(
                    "{}: an image cannot be its own backing file",
                    path.display()
                );
            }
            // Open the whole chain as qemu-img create does (read-only, shared),
            // so a missing, misnamed or looping backing is refused now.
            let b = open_chain(&bpath, spec.format.clone(), true)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("{}: backing file {}: {e:#}", path.display(), spec.name)
                })?;
            if size.is_none() {
                size = Some(b.size());
            }
        }
    }
    let Some(size) = size else {
        anyhow::bail!(
            "{}: a size is needed when there is no backing file",
            path.display()
        );
    };
    let _held = image::lock::lock_for_create(path).map_err(|e| file_error(path, e))?;
    if !a.quiet {
        let mut line = format!("Formatting '{}', fmt={}", path.display(), kind.name());
        if let Some(c) = fo.cluster_size {
            line += &format!(" cluster_size={c}");
        }
        line += &format!(" size={size}");
        if let Some(spec) = &backing {
            line += &format!(
                " backing_file={} backing_fmt={}",
                spec.name,
                spec.format.as_deref().unwrap_or("")
            );
        }
        println!("{line}");
    }
    let opts = CreateOptions {
        size: Some(size),
        backing,
        cluster_size: fo.cluster_size,
        cache: a.cache,
    };
    image::create(path, kind, &opts)
        .await
        .map_err(|e| file_error(path, e))?;
    if let Some(id) = &identity
        && let Err(e) = image::open::record_backing_identity(path, id).await
    {
        let _ = std::fs::remove_file(path);
        return Err(file_error(path, e));
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether two paths name the same existing file (or the same path).
pub fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}
