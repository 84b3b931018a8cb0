//! Helpers shared by the NBD integration tests: a server on a Unix socket
//! in a temporary directory (run on its own runtime thread, stopped on drop),
//! a memory device with scripted block status, test images, and bounded
//! runs of the peer tools.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use image::{BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags};
use nbd::server::{self, Export, Listener, ServerConfig};
use tokio::sync::oneshot;

/// A device in memory whose block status is scripted, with an optional
/// delay per request and a flush counter.
#[derive(Debug)]
pub struct MemDevice {
    pub data: Mutex<Vec<u8>>,
    pub extents: Vec<Extent>,
    pub delay: Duration,
    pub flushes: AtomicU64,
    pub read_only: bool,
}

impl MemDevice {
    pub fn new(data: Vec<u8>, extents: Vec<Extent>) -> Self {
        MemDevice {
            data: Mutex::new(data),
            extents,
            delay: Duration::ZERO,
            flushes: AtomicU64::new(0),
            read_only: false,
        }
    }
    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

pub fn extent(offset: u64, length: u64, kind: ExtentKind, depth: Option<u32>) -> Extent {
    Extent {
        offset,
        length,
        kind,
        depth,
        host_offset: None,
        compressed: false,
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: "mem".into(),
            format: "mem".into(),
            read_only: self.read_only,
            layers: 3,
            granularity: 512,
            can_flush: true,
        }
    }
    async fn read(&self, offset: u64, len: usize) -> image::Result<Vec<u8>> {
        self.pause().await;
        image::device::check_range(self.size(), offset, len as u64)?;
        let d = self.data.lock().unwrap();
        Ok(d[offset as usize..offset as usize + len].to_vec())
    }
    async fn write(&self, offset: u64, data: Bytes, _f: WriteFlags) -> image::Result<()> {
        self.pause().await;
        image::device::check_range(self.size(), offset, data.len() as u64)?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _u: bool) -> image::Result<()> {
        self.pause().await;
        image::device::check_range(self.size(), offset, len)?;
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> image::Result<()> {
        image::device::check_range(self.size(), offset, len)
    }
    async fn flush(&self) -> image::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn block_status(&self, offset: u64, len: u64) -> image::Result<Vec<Extent>> {
        image::device::check_range(self.size(), offset, len)?;
        let end = offset + len;
        Ok(self
            .extents
            .iter()
            .filter(|e| e.end() > offset && e.offset < end)
            .copied()
            .collect())
    }
}

/// A server running on its own thread and runtime.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Served {
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
    /// Stops the server and returns what `run` returned.
    pub fn stop(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.thread.take().unwrap().join().unwrap()
    }
    /// Waits (bounded) for `run` to return by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> std::io::Result<()> {
        let t = self.thread.take().unwrap();
        let start = std::time::Instant::now();
        while !t.is_finished() {
            assert!(
                start.elapsed() < limit,
                "server did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a server; `make` builds the config inside the server's runtime
/// (so it may open images).
pub fn serve<F, Fut>(make: F) -> Served
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ServerConfig>,
{
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let s2 = sock.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let config = make().await;
            let l = Listener::bind_unix(&s2)?;
            ready_tx.send(()).unwrap();
            server::run(l, config, async {
                let _ = stop_rx.await;
            })
            .await
        })
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server did not start");
    Served {
        dir,
        sock,
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

/// Opens `path` as a raw image and exports it under `name`.
pub async fn image_export(path: &Path, name: &str, read_only: bool) -> Export {
    let opts = image::OpenOptions {
        writable: !read_only,
        format: Some("raw".into()),
        ..Default::default()
    };
    let img = image::open(path, &opts).await.unwrap();
    Export {
        name: name.into(),
        description: format!("test image {}", path.display()),
        device: img,
        read_only,
        multi_conn: true,
    }
}

pub fn mem_export(name: &str, dev: Arc<MemDevice>, read_only: bool) -> Export {
    Export {
        name: name.into(),
        description: String::new(),
        device: dev,
        read_only,
        multi_conn: true,
    }
}

/// Deterministic bytes (xorshift) so every test compares against a known pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw image of `size` bytes with data only in `[data_at, data_at+data_len)`
/// (the rest a sparse hole); returns its content.
pub fn sparse_raw(path: &Path, size: u64, data_at: u64, data_len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let d = pattern(data_len, size ^ data_at);
    f.write_all_at(&d, data_at).unwrap();
    let mut all = vec![0u8; size as usize];
    all[data_at as usize..data_at as usize + data_len].copy_from_slice(&d);
    all
}

/// Runs a peer tool under `timeout`, returning its output.
pub fn tool(limit_secs: u32, prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(limit_secs.to_string())
        .arg(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

/// Runs a peer tool that must succeed; returns stdout.
pub fn tool_ok(limit_secs: u32, prog: &str, args: &[&str]) -> String {
    let out = tool(limit_secs, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn have(prog: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {prog}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Waits (bounded) until a Unix socket accepts connections.
pub fn wait_socket(path: &Path, limit: Duration) {
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            start.elapsed() < limit,
            "{} not accepting within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
