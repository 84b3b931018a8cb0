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
    /// relative to the directory of IMAGE, as in QEMU. nbd:// and http(s)://
    /// URLs too (HTTPS trusts the system's CA certificates, or the PEM file
    /// named by SSL_CERT_FILE).
    #[arg(short = 'b', long = "backing")]
    backing: Option<String>,
    /// Format of the backing file (required with -b; never probed).
    #[arg(short = 'F', long = "backing-format")]
    backing_format: Option<String>,
    /// Format options, comma separated. qcow2: cluster_size=N (a power of
    /// two from 512 bytes to 2 MiB, suffixes allowed), extended_l2=on|off
    /// (subclusters; clusters of at least 16 KiB), compat=0.10|1.1,
    /// refcount_bits=1|2|4|8|16|32|64, lazy_refcounts=on|off. qed:
    /// cluster_size=N (4 KiB to 64 MiB), table_size=N (clusters, 1 to 16).
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
    /// QED only: L1/L2 table size in clusters.
    pub table_size: Option<u32>,
    /// qcow2 extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// On-disk qcow2 features (compat, refcount_bits, lazy_refcounts).
    pub qcow2: image::qcow2::Features,
    /// The feature options given, as `key=value` for the "Formatting" line.
    pub given: Vec<String>,
}

fn on_off(k: &str, v: &str, image: &std::path::Path) -> anyhow::Result<bool> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => anyhow::bail!("{}: {k}: expected on or off, not '{v}'", image.display()),
    }
}

/// Parses `-o key=value[,key=value...]` for an image of format `kind`.
pub fn parse_options(
    s: Option<&str>,
    image: &std::path::Path,
    kind: FormatKind,
) -> anyhow::Result<FormatOptions> {
    let mut o = FormatOptions::default();
    let Some(s) = s else { return Ok(o) };
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            anyhow::anyhow!(
                "{}: invalid option '{item}' (expected key=value)",
                image.display()
            )
        })?;
        match (k, kind) {
            ("cluster_size", FormatKind::Qcow2 | FormatKind::Qed) => {
                let n = parse_size(v)
                    .map_err(|e| anyhow::anyhow!("{}: cluster_size: {e}", image.display()))?;
                // qcow2: 512 B..2 MiB; QED: 4 KiB..64 MiB (the formats' limits).
                let (lo, hi) = if kind == FormatKind::Qcow2 {
                    (512, 2 << 20)
                } else {
                    (4 << 10, 64 << 20)
                };
                if !n.is_power_of_two() || !(lo..=hi).contains(&n) {
                    anyhow::bail!(
                        "{}: cluster_size {n} must be a power of two between {lo} and {hi}",
                        image.display()
                    );
                }
                o.cluster_size = Some(n);
            }
            ("table_size", FormatKind::Qed) => {
                let n: u32 = v.parse().map_err(|_| {
                    anyhow::anyhow!("{}: table_size: not a number: {v}", image.display())
                })?;
                if !n.is_power_of_two() || !(1..=16).contains(&n) {
                    anyhow::bail!(
                        "{}: table_size {n} must be a power of two between 1 and 16 (clusters)",
                        image.display()
                    );
                }
                o.table_size = Some(n);
            }
            ("extended_l2", FormatKind::Qcow2) => {
                o.extended_l2 = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => anyhow::bail!(
                        "{}: extended_l2 must be on or off, not '{v}'",
                        image.display()
                    ),
                };
            }
            ("compat", FormatKind::Qcow2) => {
                o.qcow2.version_2 = match v {
                    "0.10" | "v2" => true,
                    "1.1" | "v3" => false,
                    _ => anyhow::bail!(
                        "{}: compat: expected 0.10 or 1.1, not '{v}'",
                        image.display()
                    ),
                };
                o.given.push(format!("compat={v}"));
            }
            ("refcount_bits", FormatKind::Qcow2) => {
                let n: u32 = v.parse().map_err(|_| {
                    anyhow::anyhow!("{}: refcount_bits: not a number: '{v}'", image.display())
                })?;
                if !n.is_power_of_two() || n > 64 {
                    anyhow::bail!(
                        "{}: refcount_bits {n} must be a power of two from 1 to 64",
                        image.display()
                    );
                }
                o.qcow2.refcount_bits = Some(n);
                o.given.push(format!("refcount_bits={n}"));
            }
            ("lazy_refcounts", FormatKind::Qcow2) => {
                o.qcow2.lazy_refcounts = on_off(k, v, image)?;
                o.given.push(format!("lazy_refcounts={v}"));
            }
            (
                "cluster_size" | "table_size" | "extended_l2" | "compat" | "refcount_bits"
                | "lazy_refcounts",
                _,
            ) => anyhow::bail!(
                "{}: {k} is not an option of {} images",
                image.display(),
                kind.name()
            ),
            _ => anyhow::bail!(
                "{}: unknown option '{k}' (known: cluster_size, extended_l2, compat, \
                 refcount_bits, lazy_refcounts for qcow2; cluster_size, table_size for qed)",
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
    let fo = parse_options(a.options.as_deref(), path, kind)?;
    // Same rules as qemu-img, before the file is touched.
    fo.qcow2
        .refcount_order(path)
        .map_err(|e| file_error(path, e))?;
    if a.backing_format.is_some() && a.backing.is_none() {
        anyhow::bail!("{}: -F needs a backing file (-b)", path.display());
    }
    let backing = match &a.backing {
        None => None,
        Some(name) => {
            if kind == FormatKind::Raw {
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
            if name.starts_with("nbds://") || name.starts_with("nbds+unix://") {
                // Never write a backing name QEMU cannot open.
                anyhow::bail!(
                    "{}: backing file {name}: QEMU has no nbds:// scheme; name the backing \
                     nbd://... or nbd+unix://... and choose TLS when opening it \
                     (diskstream --nbd-tls-ca; QEMU: a tls-creds-x509 object and tls-creds)",
                    path.display()
                );
            }
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
            let opener = super::network_opener();
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
        if let Some(t) = fo.table_size {
            line += &format!(" table_size={t}");
        }
        if fo.extended_l2 {
            line += " extended_l2=on";
        }
        for g in &fo.given {
            line += &format!(" {g}");
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
        table_size: fo.table_size,
        extended_l2: fo.extended_l2,
        cache: a.cache,
        qcow2_features: fo.qcow2.clone(),
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
