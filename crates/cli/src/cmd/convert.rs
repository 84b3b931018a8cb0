//! `diskstream convert`: copy an image (with its backing chain flattened)
//! into a new qcow2 or raw image, like `qemu-img convert`.
//!
//! Only data is copied: block status of the source says which ranges are
//! holes or zeros, and those are never read nor written (the destination is
//! freshly created, so it already reads as zeros there); inside data ranges,
//! 4 KiB blocks that are all zeros are skipped too, as qemu-img's default
//! `-S 4k` does. Data ranges are cut into large chunks, and up to `-m` chunks
//! are in flight at once as tokio tasks over the async `BlockDevice`
//! (qemu-img keeps 8 coroutines, so that is the default); writes land out of
//! order, like qemu-img -W. The destination is flushed and closed at the end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use image::device::block_status_all;
use image::iobuf::IoBuf;
use image::open::{BackingChoice, OpenOptions};
use image::{
    BlockDevice, CacheMode, CreateOptions, ExtentKind, Format, FormatKind, Image, WriteFlags,
};
use tokio::task::JoinSet;

use super::create::{parse_options, same_file};
use super::progress::Progress;
use super::{file_error, open_chain, walk_chain};

/// Bytes per chunk in flight (qemu-img uses 2 MiB buffers); one pooled
/// [`IoBuf`].
const CHUNK: u64 = image::iobuf::POOL_BUF_SIZE as u64;
/// Zero detection granularity: qemu-img's default `-S 4k`.
const SPARSE: usize = 4096;

/// Copy an image into a new image, skipping holes and zeros.
///
/// The source (and its backing chain) is read-only and comes out flattened:
/// the destination has no backing. An existing destination is overwritten,
/// as qemu-img does, unless another process has it open.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of SRC (default: probed; backings are never probed).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Format of DST: qcow2 or raw.
    #[arg(short = 'O', long = "output-format", default_value = "raw")]
    out_format: String,
    /// Options for DST, as for create: cluster_size=N.
    #[arg(short = 'o', long = "options")]
    options: Option<String>,
    /// Cache mode of DST: writeback (page cache) or none (O_DIRECT).
    #[arg(short = 't', long = "cache", default_value = "writeback")]
    cache: CacheMode,
    /// Show progress on a terminal.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Chunks in flight at once (1..=64).
    #[arg(short = 'm', long = "parallel", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Accepted for qemu-img compatibility: writes are always out of order.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Open SRC even if another process writes it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image.
    src: PathBuf,
    /// Destination image (created or overwritten).
    dst: PathBuf,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let dst_path = &a.dst;
    let kind = FormatKind::parse(&a.out_format).map_err(|e| file_error(dst_path, e))?;
    let fo = parse_options(a.options.as_deref(), dst_path, kind)?;
    fo.qcow2
        .refcount_order(dst_path)
        .map_err(|e| file_error(dst_path, e))?;
    let src = open_chain(&a.src, a.format.clone(), a.force_share).await?;
    let layers = walk_chain(&a.src, a.format.clone(), true).await?;
    for layer in &layers {
        if same_file(dst_path, std::path::Path::new(&layer.filename)) {
            anyhow::bail!(
                "{}: the destination is the source image (or one of its backing files)",
                dst_path.display()
            );
        }
    }
    let size = src.size();
    let extents = block_status_all(&*src, 0, size)
        .await
        .map_err(|e| file_error(&a.src, e))?;

    let held = image::lock::lock_for_create(dst_path).map_err(|e| file_error(dst_path, e))?;
    let copts = CreateOptions {
        size: Some(size),
        cluster_size: fo.cluster_size,
        table_size: fo.table_size,
        extended_l2: fo.extended_l2,
        cache: a.cache,
        qcow2_features: fo.qcow2.clone(),
        ..CreateOptions::default()
    };
    image::create(dst_path, kind, &copts)
        .await
        .map_err(|e| file_error(dst_path, e))?;
    // Our own writable open below would conflict with the create locks.
    drop(held);
    let oopts = OpenOptions {
        writable: true,
        cache: a.cache,
        format: Some(kind.name().to_string()),
        backing: BackingChoice::None,
        ..OpenOptions::default()
    };
    let dst = image::open(dst_path, &oopts)
        .await
        .map_err(|e| file_error(dst_path, e))?;

    let mut chunks = Vec::new();
    for e in extents.iter().filter(|e| e.kind == ExtentKind::Data) {
        let mut off = e.offset;
        while off < e.end() {
            let len = CHUNK.min(e.end() - off);
            chunks.push((off, len, e.depth));
            off += len;
        }
    }
    let total: u64 = chunks.iter().map(|c| c.1).sum();
    let progress = Arc::new(Progress::new(total, a.progress));
    let layer_formats: Arc<Vec<Arc<dyn Format>>> = Arc::new(
        layers
            .iter()
            .map(|l| Arc::clone(l.image.format()))
            .collect(),
    );

    let mut tasks = JoinSet::new();
    let mut queue = chunks.into_iter();
    let limit = a.parallel as usize;
    loop {
        while tasks.len() < limit {
            let Some((off, len, depth)) = queue.next() else {
                break;
            };
            let job = Chunk {
                src: Arc::clone(&src),
                dst: Arc::clone(&dst),
                layer: depth.and_then(|d| layer_formats.get(d as usize).cloned()),
                off,
                len: len as usize,
            };
            let p = Arc::clone(&progress);
            tasks.spawn(async move {
                job.copy().await?;
                p.add(len);
                Ok::<(), image::Error>(())
            });
        }
        match tasks.join_next().await {
            None => break,
            Some(r) => r?.map_err(|e| file_error(dst_path, e))?,
        }
    }
    dst.flush().await.map_err(|e| file_error(dst_path, e))?;
    dst.close().await.map_err(|e| file_error(dst_path, e))?;
    progress.finish();
    Ok(ExitCode::SUCCESS)
}

/// One chunk to copy, and where to read it.
struct Chunk {
    src: Arc<Image>,
    dst: Arc<Image>,
    /// The format of the layer block status says holds the chunk, read
    /// directly into a pooled buffer; `None` reads through the chain.
    layer: Option<Arc<dyn Format>>,
    off: u64,
    len: usize,
}

impl Chunk {
    /// Copies the chunk, skipping 4 KiB blocks of zeros.
    async fn copy(self) -> image::Result<()> {
        let (off, len) = (self.off, self.len);
        // Pooled and 4 KiB aligned: no zeroing, no O_DIRECT bounce copy.
        let mut buf = IoBuf::take(len);
        let holes = match self.layer.clone() {
            Some(fmt) => {
                let (b, holes) = tokio::task::spawn_blocking(move || {
                    let holes = fmt.read(off, &mut buf);
                    (buf, holes)
                })
                .await
                .map_err(|e| image::Error::Internal(format!("read task: {e}")))?;
                buf = b;
                holes?
            }
            None => vec![(off, len as u64)],
        };
        // Whatever that layer did not hold after all comes through the chain.
        for (hoff, hlen) in holes {
            let data = self.src.read(hoff, hlen as usize).await?;
            let at = (hoff - off) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
        }
        let runs = image::iobuf::nonzero_runs(&buf, SPARSE);
        let data = Bytes::from_owner(buf);
        for (start, end) in runs {
            self.dst
                .write(
                    off + start as u64,
                    data.slice(start..end),
                    WriteFlags::default(),
                )
                .await?;
        }
        Ok(())
    }
}
