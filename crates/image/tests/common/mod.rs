//! Helpers shared by the image crate's integration tests: running the real
//! `qemu-img`, building images in memory or in temporary directories, reading
//! a whole device. Each test binary uses a different subset.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use image::device::BlockDevice;
use image::format::{BackingSpec, Format};
use image::open::{FormatKind, OpenOptions, open_format};
use image::storage::{MemStorage, Storage};
use image::testing::TestRng;
use image::{Image, qcow2, raw};

/// Runs `qemu-img` with `args`; returns (exit code, stdout + stderr).
pub fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `qemu-img check`: Ok for exit 0 (clean) or 3 (leaks only), else the
/// output. 2 is corruption, 1 a check that could not finish.
pub fn qemu_check(path: &Path) -> Result<i32, String> {
    let p = path.to_str().unwrap();
    let (code, text) = qemu_img(&["check", "-f", "qcow2", p]);
    match code {
        0 | 3 => Ok(code),
        _ => Err(format!("qemu-img check {p} exited {code}:\n{text}")),
    }
}

/// Whether a qcow2 header has the dirty bit (incompatible feature bit 0).
pub fn qcow2_dirty(bytes: &[u8]) -> bool {
    bytes.len() >= 80 && bytes[0..4] == qcow2::MAGIC && bytes[79] & 1 != 0
}

pub fn writable() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

/// A read-only raw device over `content` in memory.
pub fn mem_raw(name: &str, content: Vec<u8>) -> Arc<dyn BlockDevice> {
    let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(name, content));
    let f: Arc<dyn Format> = Arc::new(raw::Raw::open(s, false).unwrap());
    Arc::new(Image::new(f, None))
}

/// The bytes of a fresh qcow2 image made by `qemu-img create` (the
/// reference producer; `-u`: the backing is not opened). Harnesses that test
/// I/O start from these, so a limit of our own `create` (tested by the
/// conformance suite) does not hide the engine's I/O paths.
pub fn qemu_qcow2_bytes(size: u64, cluster: u64, backing: Option<(&str, &str)>) -> Vec<u8> {
    qemu_qcow2_bytes_with(size, cluster, backing, "")
}

/// [`qemu_qcow2_bytes`] with more `-o` options (`extra`, comma separated,
/// e.g. `lazy_refcounts=on`).
pub fn qemu_qcow2_bytes_with(
    size: u64,
    cluster: u64,
    backing: Option<(&str, &str)>,
    extra: &str,
) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("new.qcow2");
    let mut opts = format!("cluster_size={cluster}");
    if !extra.is_empty() {
        opts = format!("{opts},{extra}");
    }
    let mut args = vec![
        "create".to_string(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        opts,
    ];
    if let Some((n, f)) = backing {
        args.extend(["-u".into(), "-b".into(), n.into(), "-F".into(), f.into()]);
    }
    args.extend([p.to_str().unwrap().to_string(), size.to_string()]);
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (code, out) = qemu_img(&a);
    assert_eq!(code, 0, "qemu-img {a:?}: {out}");
    std::fs::read(&p).unwrap()
}

/// A qcow2 image in memory made by our own `qcow2::create`.
pub fn mem_qcow2_bytes(size: u64, cluster: u64, backing: Option<(&str, &str)>) -> Vec<u8> {
    let m = MemStorage::new("new.qcow2");
    qcow2::create(
        &m,
        &qcow2::CreateOptions {
            size,
            cluster_size: Some(cluster),
            backing: backing.map(|(n, f)| BackingSpec {
                name: n.into(),
                format: Some(f.into()),
            }),
            ..Default::default()
        },
    )
    .expect("qcow2::create");
    m.snapshot()
}

/// Opens a qcow2 engine over storage.
pub async fn open_qcow2(s: Arc<dyn Storage>, writable: bool) -> image::Result<Arc<dyn Format>> {
    let o = OpenOptions {
        writable,
        ..OpenOptions::default()
    };
    open_format(s, FormatKind::Qcow2, &o).await
}

/// Reads a whole device in chunks.
pub async fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let size = dev.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20);
        out.extend(dev.read(pos, n as usize).await.expect("read"));
        pos += n;
    }
    out
}

/// Random content with runs of zeros and runs of data, so backings have
/// both holes and data at every granularity.
pub fn patchy(rng: &mut TestRng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let run = (rng.range(1, 64) * 512) as usize;
        let end = (pos + run).min(size);
        if rng.chance(2, 3) {
            rng.fill(&mut v[pos..end]);
        }
        pos = end;
    }
    v
}

/// FNV-1a of a file, to see that it did not change.
pub fn file_hash(path: &Path) -> (u64, u64) {
    let bytes = std::fs::read(path).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    (bytes.len() as u64, h)
}

/// Runs `fut` on a fresh runtime. If it has not finished after `limit`, the
/// runtime is abandoned (`shutdown_background`: its blocking threads go on
/// until the test process exits) and this panics, so a hung engine fails
/// the test instead of hanging the run: a `tokio::time::timeout` alone does
/// not, because dropping a runtime waits for its running blocking tasks.
pub fn with_deadline<F: std::future::Future>(
    what: &str,
    limit: std::time::Duration,
    fut: F,
) -> F::Output {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(async { tokio::time::timeout(limit, fut).await }) {
        Ok(v) => v,
        Err(_) => {
            rt.shutdown_background();
            panic!("{what}: did not finish in {limit:?} (hung or pathologically slow)");
        }
    }
}

/// [`qemu_qcow2_bytes`] with `qemu-img create -o` options of the caller's
/// choosing (e.g. `cluster_size=65536,extended_l2=on`).
pub fn qemu_qcow2_bytes_opts(size: u64, options: &str, backing: Option<(&str, &str)>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("new.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", options];
    if let Some((n, f)) = backing {
        args.extend(["-u", "-b", n, "-F", f]);
    }
    let size = size.to_string();
    args.extend([p.to_str().unwrap(), size.as_str()]);
    let (code, out) = qemu_img(&args);
    assert_eq!(code, 0, "qemu-img {args:?}: {out}");
    std::fs::read(&p).unwrap()
}

/// [`qemu_check`] for an image of format `fmt`.
pub fn qemu_check_as(path: &Path, fmt: &str) -> Result<i32, String> {
    let p = path.to_str().unwrap();
    let (code, text) = qemu_img(&["check", "-f", fmt, p]);
    match code {
        0 | 3 => Ok(code),
        _ => Err(format!(
            "qemu-img check -f {fmt} {p} exited {code}:\n{text}"
        )),
    }
}

/// Our read-only `check()` of the qcow2 file at `path` reports what
/// `qemu-img check` reports (corruptions, leaks, image end): for a dirty
/// lazy-refcounts image, the stale refcounts before any repair.
pub async fn check_agrees_with_qemu(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img must be installed");
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "qemu-img check {}: {e}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let img = image::open(path, &OpenOptions::default())
        .await
        .map_err(|e| format!("read-only open: {e}"))?;
    let r = img
        .format()
        .check(None)
        .map_err(|e| format!("check: {e}"))?;
    let field = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    if r.corruptions != field("corruptions")
        || r.leaks != field("leaks")
        || r.image_end_offset != q.get("image-end-offset").and_then(|v| v.as_u64())
    {
        return Err(format!(
            "check differs from qemu-img's: ours corruptions {} leaks {} end {:?}; qemu-img {q}",
            r.corruptions, r.leaks, r.image_end_offset
        ));
    }
    Ok(())
}

/// The engines with a metadata lock of their own, for the tests that run
/// one concurrency scenario on each.
#[derive(Clone, Copy, Debug)]
pub enum Engine {
    Qcow2,
    Qed,
}

/// Opens `storage` as an image of `engine`.
pub fn open_engine(engine: Engine, storage: Arc<dyn Storage>, writable: bool) -> Arc<dyn Format> {
    match engine {
        Engine::Qcow2 => Arc::new(
            image::qcow2::Qcow2::open(
                storage,
                &image::qcow2::Qcow2Options {
                    writable,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        Engine::Qed => Arc::new(
            image::qed::Qed::open(
                storage,
                &image::qed::QedOptions {
                    writable,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
    }
}

/// A new `size`-byte image of `engine` with `cluster`-byte clusters on `st`,
/// `data` written at offset 0, closed and opened again read-write (so
/// nothing is cached and QED's need-check flag, which a flush may only
/// clear after a quiet time, is clear).
pub fn engine_with_data<S: Storage + 'static>(
    engine: Engine,
    st: &Arc<S>,
    size: u64,
    cluster: u64,
    data: &[u8],
) -> Arc<dyn Format> {
    match engine {
        Engine::Qcow2 => qcow2::create(
            &**st,
            &qcow2::CreateOptions {
                size,
                cluster_size: Some(cluster),
                ..Default::default()
            },
        )
        .unwrap(),
        Engine::Qed => image::qed::create(
            &**st,
            &image::qed::CreateOptions {
                size,
                cluster_size: Some(cluster),
                ..Default::default()
            },
        )
        .unwrap(),
    }
    let storage = || Arc::clone(st) as Arc<dyn Storage>;
    let f = open_engine(engine, storage(), true);
    f.write(0, data, &[]).unwrap();
    f.close().unwrap();
    drop(f);
    open_engine(engine, storage(), true)
}
