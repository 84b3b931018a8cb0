//! The one entry point that opens and creates images.
//!
//! [`open`] opens an image file of any format from an [`OpenOptions`], then
//! its backing chain through the same code path, read-only, with a depth
//! counter and loop detection. Backing names are resolved like QEMU does:
//! relative paths against the directory of the image that names them. A
//! backing's format must be named (the header's backing format); content is
//! never probed below the top image, so a raw backing cannot pass itself off
//! as qcow2. Names with a URI scheme (`nbd://`, `http://` ...) go to an
//! [`Opener`] that later layers plug in; the image crate has no network code.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::device::BlockDevice;
use crate::format::{BackingSpec, Format};
use crate::identity::{self, BackingIdentity};
use crate::image::Image;
use crate::storage::{CacheMode, FileStorage, Storage};
use crate::{Error, Result, lock, qcow2, qed, raw};

/// Same bound as crosvm's `MAX_NESTING_DEPTH`; QEMU has none, but a chain this
/// deep is a loop or an attack, not a deployment.
pub const MAX_CHAIN_DEPTH: u32 = 16;

/// Opens backings named by URI. Returns `Ok(None)` for names it does not handle.
#[async_trait]
pub trait Opener: Send + Sync + std::fmt::Debug {
    async fn open_backing(
        &self,
        name: &str,
        format: Option<&str>,
        opts: &OpenOptions,
    ) -> Result<Option<Arc<dyn BlockDevice>>>;

    /// What the backing `name` is right now, to record in an overlay created
    /// on it (see [`crate::identity`]). `Ok(None)` for names it does not
    /// handle.
    async fn identify(&self, name: &str, format: Option<&str>) -> Result<Option<BackingIdentity>> {
        let _ = (name, format);
        Ok(None)
    }
}

/// Several openers as one: each name goes to the first that handles it
/// (`nbd://` to the NBD client, `http(s)://` to the HTTP source ...).
#[derive(Clone, Debug, Default)]
pub struct Openers(pub Vec<Arc<dyn Opener>>);

#[async_trait]
impl Opener for Openers {
    async fn open_backing(
        &self,
        name: &str,
        format: Option<&str>,
        opts: &OpenOptions,
    ) -> Result<Option<Arc<dyn BlockDevice>>> {
        for o in &self.0 {
            if let Some(dev) = o.open_backing(name, format, opts).await? {
                return Ok(Some(dev));
            }
        }
        Ok(None)
    }

    async fn identify(&self, name: &str, format: Option<&str>) -> Result<Option<BackingIdentity>> {
        for o in &self.0 {
            if let Some(id) = o.identify(name, format).await? {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }
}

/// Which backing an image gets.
#[derive(Clone, Debug, Default)]
pub enum BackingChoice {
    /// The one its header names.
    #[default]
    FromHeader,
    /// None, whatever the header says (QEMU's `backing: null`).
    None,
    /// This device.
    Device(Arc<dyn BlockDevice>),
}

/// Options for [`open`].
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub writable: bool,
    /// Cache mode of the image itself.
    pub cache: CacheMode,
    /// Cache mode of the backing chain below it. Writeback by default even
    /// when the image is O_DIRECT: the chain is only read, and a base that
    /// many overlays share is worth keeping in the page cache (QEMU's
    /// backings inherit `cache.direct` unless the user names them).
    pub backing_cache: CacheMode,
    /// Like `qemu-img -U`: open even while another process writes the image.
    pub force_share: bool,
    /// The format; `None` probes the top image (never a backing).
    pub format: Option<String>,
    pub backing: BackingChoice,
    pub opener: Option<Arc<dyn Opener>>,
    pub max_depth: u32,
    /// Bytes of qcow2 L2 tables kept in memory; `None` for the default.
    pub metadata_cache_bytes: Option<u64>,
    /// A read-write open of a qcow2 image with persistent bitmaps discards
    /// them instead of failing (the top image only).
    pub drop_bitmaps: bool,
    /// For an [`Opener`]: the identity the overlay recorded for this backing
    /// (see [`crate::identity`]); the opener checks it on open and after
    /// every reconnect. Set by [`open`] from the image that names the backing.
    pub expect_identity: Option<crate::identity::BackingIdentity>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            cache: CacheMode::Writeback,
            backing_cache: CacheMode::Writeback,
            force_share: false,
            format: None,
            backing: BackingChoice::FromHeader,
            opener: None,
            max_depth: MAX_CHAIN_DEPTH,
            metadata_cache_bytes: None,
            drop_bitmaps: false,
            expect_identity: None,
        }
    }
}

/// Image formats diskstream knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FormatKind {
    Qcow2,
    Qed,
    Raw,
}

impl FormatKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "qcow2" => Ok(FormatKind::Qcow2),
            "qed" => Ok(FormatKind::Qed),
            "raw" => Ok(FormatKind::Raw),
            other => Err(Error::InvalidInput(format!(
                "unknown image format '{other}' (known: qcow2, qed, raw)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FormatKind::Qcow2 => "qcow2",
            FormatKind::Qed => "qed",
            FormatKind::Raw => "raw",
        }
    }

    /// Whether the format keeps metadata in the file (QEMU then never lets
    /// another process write or resize it).
    pub fn has_metadata(self) -> bool {
        self != FormatKind::Raw
    }
}

/// Guesses the format of a top image from its first bytes.
pub fn probe(storage: &dyn Storage) -> Result<FormatKind> {
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .map_err(|e| Error::io(storage.path(), "read header", e))?;
    Ok(if magic == qcow2::MAGIC {
        FormatKind::Qcow2
    } else if magic == qed::MAGIC {
        FormatKind::Qed
    } else {
        FormatKind::Raw
    })
}

/// [`lock::apply`], retried for a moment on a conflict. A child process
/// that another thread of this process forks holds a copy of every
/// descriptor, and so its OFD locks, until it execs: a lock this process
/// has just released can look held for that long. A real holder still
/// wins after the last attempt (about 50 ms).
async fn apply_lock(
    storage: &dyn Storage,
    metadata: bool,
    access: lock::Access,
    force_share: bool,
) -> Result<()> {
    const ATTEMPTS: u32 = 6;
    let mut attempt = 1;
    loop {
        match lock::apply(storage, metadata, access, force_share) {
            Err(e) if e.kind() == crate::ErrorKind::Locked && attempt < ATTEMPTS => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
}

/// Opens the image at `path` and its backing chain.
pub async fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<Image>> {
    let mut seen = HashSet::new();
    open_at_depth(path, opts, 0, &mut seen).await
}

fn open_at_depth<'a>(
    path: &'a Path,
    opts: &'a OpenOptions,
    depth: u32,
    seen: &'a mut HashSet<PathBuf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<Image>>> + Send + 'a>> {
    Box::pin(async move {
        let canonical = std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_owned(),
                message: "no such file".into(),
            },
            _ => Error::io(path, "open", e),
        })?;
        if !seen.insert(canonical.clone()) {
            return Err(Error::Backing {
                path: path.to_owned(),
                backing: path.display().to_string(),
                message: "backing chain loops back to this image".into(),
            });
        }
        let storage: Arc<dyn Storage> = {
            let (p, w, c) = (canonical.clone(), opts.writable, opts.cache);
            let fs = tokio::task::spawn_blocking(move || FileStorage::open(&p, w, c))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
                .map_err(|e| Error::io(path, "open", e))?;
            Arc::new(fs)
        };
        let kind = match &opts.format {
            Some(f) => FormatKind::parse(f)?,
            None => probe(&*storage)?,
        };
        let access = match (opts.writable, depth) {
            (true, _) => lock::Access::ReadWrite,
            (false, 0) => lock::Access::Read,
            (false, _) => lock::Access::Backing,
        };
        apply_lock(&*storage, kind.has_metadata(), access, opts.force_share).await?;
        // The backing chain is opened before the top image is opened
        // read-write: a read-write open may write (clear autoclear bits,
        // repair a dirty image), and an open that then fails on the chain
        // must leave the file as it was. A read-only engine reads the
        // backing name; it writes nothing.
        let from_header = matches!(opts.backing, BackingChoice::FromHeader);
        let first = if opts.writable && from_header {
            let ro = OpenOptions {
                writable: false,
                ..opts.clone()
            };
            open_format(Arc::clone(&storage), kind, &ro).await?
        } else {
            open_format(Arc::clone(&storage), kind, opts).await?
        };
        let backing = match &opts.backing {
            BackingChoice::None => None,
            BackingChoice::Device(d) => Some(Arc::clone(d)),
            BackingChoice::FromHeader => match first.backing() {
                None => None,
                Some(spec) => {
                    let recorded = recorded_identity(path, &*first)?;
                    Some(open_backing(path, kind, &spec, opts, recorded, depth, seen).await?)
                }
            },
        };
        let format = if opts.writable && from_header {
            drop(first);
            open_format(storage, kind, opts).await?
        } else {
            first
        };
        Ok(Arc::new(Image::new(format, backing)))
    })
}

/// Opens the format engine over already opened storage (also used by tests
/// that run the engine over memory or a recording layer).
pub async fn open_format(
    storage: Arc<dyn Storage>,
    kind: FormatKind,
    opts: &OpenOptions,
) -> Result<Arc<dyn Format>> {
    let writable = opts.writable;
    let cache_bytes = opts.metadata_cache_bytes;
    let drop_bitmaps = opts.drop_bitmaps;
    let task = tokio::task::spawn_blocking(move || -> Result<Arc<dyn Format>> {
        Ok(match kind {
            FormatKind::Qcow2 => {
                let o = qcow2::Qcow2Options {
                    writable,
                    cache_bytes,
                    drop_bitmaps,
                };
                Arc::new(qcow2::Qcow2::open(storage, &o)?)
            }
            FormatKind::Qed => {
                let o = qed::QedOptions {
                    writable,
                    cache_bytes,
                };
                Arc::new(qed::Qed::open(storage, &o)?)
            }
            FormatKind::Raw => Arc::new(raw::Raw::open(storage, writable)?),
        })
    });
    task.await.map_err(|e| Error::Internal(e.to_string()))?
}

/// Where a backing name points, relative names resolved against the
/// directory of the image that names it (as QEMU does).
pub fn resolve_backing_path(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_owned();
    }
    image.parent().unwrap_or(Path::new(".")).join(p)
}

/// Whether a backing name is a URI for an [`Opener`] rather than a path.
pub fn is_uri(name: &str) -> bool {
    name.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// The identity `image` recorded for its remote backing: in the format's
/// own place (qcow2 header extension), else in the sidecar file.
fn recorded_identity(image: &Path, format: &dyn Format) -> Result<Option<BackingIdentity>> {
    match format.recorded_backing_identity() {
        Some(data) => BackingIdentity::from_json(&image.display().to_string(), &data).map(Some),
        None => identity::read_sidecar(image),
    }
}

/// Records `id` as the identity of the remote backing of the image at
/// `path` (just created, not open): a qcow2 header extension, or for other
/// formats the sidecar file `IMAGE.backing-id`.
pub async fn record_backing_identity(path: &Path, id: &BackingIdentity) -> Result<()> {
    let (p, id) = (path.to_owned(), id.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let storage = FileStorage::open(&p, true, CacheMode::Writeback)
            .map_err(|e| Error::io(&p, "open", e))?;
        match probe(&storage)? {
            FormatKind::Qcow2 => qcow2::set_header_extension(
                &storage,
                qcow2::header::EXT_BACKING_IDENTITY,
                Some(&id.to_json()),
            ),
            FormatKind::Raw | FormatKind::Qed => identity::write_sidecar(&p, &id),
        }
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

async fn open_backing(
    image: &Path,
    kind: FormatKind,
    spec: &BackingSpec,
    opts: &OpenOptions,
    recorded: Option<BackingIdentity>,
    depth: u32,
    seen: &mut HashSet<PathBuf>,
) -> Result<Arc<dyn BlockDevice>> {
    let fail = |message: String| Error::Backing {
        path: image.to_owned(),
        backing: spec.name.clone(),
        message,
    };
    if depth + 1 >= opts.max_depth {
        return Err(fail(format!(
            "backing chain deeper than {} images",
            opts.max_depth
        )));
    }
    let format = backing_format(image, kind, spec).await?;
    let format = format.as_str();
    let bopts = OpenOptions {
        writable: false,
        cache: opts.backing_cache,
        format: Some(format.to_string()),
        backing: BackingChoice::FromHeader,
        expect_identity: None,
        ..opts.clone()
    };
    if is_uri(&spec.name) {
        let bopts = OpenOptions {
            expect_identity: recorded,
            ..bopts
        };
        let Some(opener) = &opts.opener else {
            return Err(fail("no opener for this URI scheme".into()));
        };
        return match opener.open_backing(&spec.name, Some(format), &bopts).await {
            Ok(Some(dev)) => Ok(dev),
            Ok(None) => Err(fail("unsupported URI scheme".into())),
            Err(e) => Err(fail(e.to_string())),
        };
    }
    FormatKind::parse(format).map_err(|e| fail(e.to_string()))?;
    let bpath = resolve_backing_path(image, &spec.name);
    match open_at_depth(&bpath, &bopts, depth + 1, seen).await {
        Ok(img) => Ok(img as Arc<dyn BlockDevice>),
        Err(e @ Error::Backing { .. }) => Err(e),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// The format to open the backing `spec` of `image` (of format `kind`)
/// with, or the refusal of a backing diskstream does not open: a `json:`
/// name, or one whose format the header does not record (backings are
/// never probed, but for QED's narrow exception below). [`open`] asks this
/// before it opens a backing; the CLI's layer-by-layer walk asks it too,
/// so that both refuse the same backings with the same message.
pub async fn backing_format(image: &Path, kind: FormatKind, spec: &BackingSpec) -> Result<String> {
    let fail = |message: String| Error::Backing {
        path: image.to_owned(),
        backing: spec.name.clone(),
        message,
    };
    if spec.name.starts_with("json:") {
        return Err(fail("json: backing names are not supported".into()));
    }
    match spec.format.as_deref() {
        Some(f) => Ok(f.to_string()),
        // QED records no backing format, only "raw, never probe" (which
        // `Qed::backing` reports as raw). Without that bit qemu probes; so
        // do we, but only for the formats with a magic: a file that probes
        // as raw is refused, so a raw backing can never pass itself off as
        // an image with a backing of its own, nor be taken for one.
        None if kind == FormatKind::Qed && !is_uri(&spec.name) => {
            let bpath = resolve_backing_path(image, &spec.name);
            let probed = probe_backing(&bpath)
                .await
                .map_err(|e| fail(e.to_string()))?;
            if probed == FormatKind::Raw {
                return Err(fail(
                    "the QED image does not mark its backing as raw (QED_F_BACKING_FORMAT_NO_PROBE) \
                     and the backing is neither qcow2 nor QED; diskstream never probes a raw \
                     backing (set it with: qemu-img rebase -u -b NAME -F raw)"
                        .into(),
                ));
            }
            Ok(probed.name().to_string())
        }
        None => Err(fail(
            "the image does not record the backing format; diskstream never probes a \
             backing (set it with: qemu-img rebase -u -b NAME -F FMT)"
                .into(),
        )),
    }
}

/// The format a QED image's unnamed backing file has, from its magic.
async fn probe_backing(path: &Path) -> Result<FormatKind> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let st =
            FileStorage::open(&p, false, CacheMode::Writeback).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound {
                    path: p.clone(),
                    message: "no such file".into(),
                },
                _ => Error::io(&p, "open", e),
            })?;
        probe(&st)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

/// QED records a backing format only as "raw, never probe"; any other is
/// found again by probing on open. Refuse what could not be found again.
async fn check_qed_backing_format(path: &Path, spec: &BackingSpec) -> Result<()> {
    let format = match spec.format.as_deref() {
        None => {
            return Err(Error::InvalidInput(format!(
                "{}: backing format must be given with -F",
                path.display()
            )));
        }
        Some("raw") => return Ok(()),
        Some(f) => FormatKind::parse(f)?,
    };
    if is_uri(&spec.name) {
        return Err(Error::InvalidInput(format!(
            "{}: a QED image can only record a raw format for the backing {}",
            path.display(),
            spec.name
        )));
    }
    let found = probe_backing(&resolve_backing_path(path, &spec.name)).await?;
    if found != format {
        return Err(Error::InvalidInput(format!(
            "{}: backing {} is not a {} image (it probes as {}); QED records no backing \
             format, so it must be found again by probing",
            path.display(),
            spec.name,
            format.name(),
            found.name()
        )));
    }
    Ok(())
}

/// Options for [`create`].
#[derive(Clone, Debug, Default)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the backing's size.
    pub size: Option<u64>,
    pub backing: Option<BackingSpec>,
    /// Cluster size; `None` for the format's default (64 KiB for both).
    pub cluster_size: Option<u64>,
    /// QED table size in clusters; `None` for the default (4).
    pub table_size: Option<u32>,
    /// qcow2 extended L2 entries (subclusters).
    pub extended_l2: bool,
    pub cache: CacheMode,
    /// qcow2 on-disk features (`compat`, `refcount_bits`, `lazy_refcounts`).
    pub qcow2_features: qcow2::Features,
}

/// Creates an image file. The file must not be left half-made: on error it
/// is removed.
pub async fn create(path: &Path, kind: FormatKind, opts: &CreateOptions) -> Result<()> {
    if kind == FormatKind::Raw && opts.backing.is_some() {
        return Err(Error::InvalidInput(
            "raw images cannot have a backing file".into(),
        ));
    }
    let size = match (opts.size, &opts.backing) {
        (Some(s), _) => s,
        (None, Some(spec)) => {
            let bopts = OpenOptions {
                format: spec.format.clone(),
                force_share: true,
                ..OpenOptions::default()
            };
            if spec.format.is_none() {
                return Err(Error::InvalidInput(format!(
                    "{}: backing format must be given with -F",
                    path.display()
                )));
            }
            if is_uri(&spec.name) {
                return Err(Error::InvalidInput(format!(
                    "{}: give the size: the backing {} is not a local file",
                    path.display(),
                    spec.name
                )));
            }
            let bpath = resolve_backing_path(path, &spec.name);
            open(&bpath, &bopts).await?.size()
        }
        (None, None) => {
            return Err(Error::InvalidInput(format!(
                "{}: a size is needed when there is no backing file",
                path.display()
            )));
        }
    };
    if kind == FormatKind::Qed
        && let Some(spec) = &opts.backing
    {
        check_qed_backing_format(path, spec).await?;
    }
    let (p, o) = (path.to_owned(), opts.clone());
    let result = tokio::task::spawn_blocking(move || -> Result<()> {
        let storage = FileStorage::create(&p, o.cache).map_err(|e| Error::io(&p, "create", e))?;
        match kind {
            FormatKind::Qcow2 => qcow2::create_with(
                &storage,
                &qcow2::CreateOptions {
                    size,
                    cluster_size: o.cluster_size,
                    backing: o.backing.clone(),
                    extended_l2: o.extended_l2,
                },
                &o.qcow2_features,
            ),
            FormatKind::Qed => qed::create(
                &storage,
                &qed::CreateOptions {
                    size,
                    cluster_size: o.cluster_size,
                    table_size: o.table_size,
                    backing: o.backing.clone(),
                },
            ),
            FormatKind::Raw => raw::create(&storage, size),
        }
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}
