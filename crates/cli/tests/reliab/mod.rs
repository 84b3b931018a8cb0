//! Shared pieces of the reliability harnesses (`daemon_crash`, `full_disk`,
//! `load`, `outage`): a `diskstream daemon` process driven over QMP by the
//! daemon crate's own client, the image cases every harness runs over, and
//! stamped data that tells, sector by sector, which write (or the backing)
//! a byte range came from.
//!
//! The one decision to know: every harness takes a [`Case`] (format plus
//! `qemu-img create -o` options), so a new format is one more line in
//! [`cases`], not a new harness. Figures are printed as `name=value` lines.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use daemon::qmp::client::{Client, ClientEvent};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Sector size the stamps are laid out in.
pub const SECTOR: usize = 512;

/// One image configuration a harness runs over.
#[derive(Clone, Debug)]
pub struct Case {
    /// Name printed in figures.
    pub name: &'static str,
    /// `qemu-img create -f` / blockdev-add driver.
    pub format: &'static str,
    /// `qemu-img create -o` options (empty: defaults).
    pub options: &'static str,
    /// Whether the format takes a backing file (the top is an overlay over
    /// the base); a raw top holds the base's data itself.
    pub backing: bool,
}

/// The image configurations every harness runs over. New formats (QED,
/// qcow2 with extended L2) are one line each here.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "qcow2",
            format: "qcow2",
            options: "",
            backing: true,
        },
        Case {
            name: "qcow2-xl2",
            format: "qcow2",
            options: "cluster_size=65536,extended_l2=on",
            backing: true,
        },
        Case {
            name: "qed",
            format: "qed",
            options: "",
            backing: true,
        },
        Case {
            name: "raw",
            format: "raw",
            options: "",
            backing: false,
        },
    ]
}

/// Cases with a backing file (the harnesses that stream need one).
pub fn overlay_cases() -> Vec<Case> {
    cases().into_iter().filter(|c| c.backing).collect()
}

/// `$DISKSTREAM_BIN` (the release binary scripts/test builds), else the one
/// cargo built for this test run.
pub fn bin() -> PathBuf {
    std::env::var_os("DISKSTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_diskstream")))
}

/// An iteration count or duration from the environment.
pub fn env_u64(var: &str, default: u64) -> u64 {
    image::testing::env_count(var, default)
}

pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Base content: sector `s` holds a stamp of "write 0" unless it falls in a
/// hole (every fourth 64 KiB cluster reads as zeros and is left sparse).
pub fn base_content(size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    for (s, sec) in v.chunks_mut(SECTOR).enumerate() {
        if (s * SECTOR / 65536) % 4 != 3 {
            stamp(sec, 0, s as u64);
        }
    }
    v
}

/// Writes the base as a sparse raw file.
pub fn write_base(path: &Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (i, c) in data.chunks(65536).enumerate() {
        if c.iter().any(|&b| b != 0) {
            f.write_all_at(c, (i * 65536) as u64).unwrap();
        }
    }
    f.sync_all().unwrap();
}

/// Creates the top image of `case` at `top` over the raw `base` (or, for a
/// format without backing, as a copy of the base).
pub fn create_top(case: &Case, base: &Path, top: &Path, size: u64) {
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    let mut args = vec!["create", "-q", "-f", case.format];
    if !case.options.is_empty() {
        args.extend(["-o", case.options]);
    }
    if case.backing {
        args.extend(["-b", b, "-F", "raw", t]);
        run_ok("qemu-img", &args);
    } else {
        let sz = size.to_string();
        args.extend([t, &sz]);
        run_ok("qemu-img", &args);
        run_ok(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", case.format, b, t],
        );
    }
}

/// Fills `sec` with the stamp of write `id` at sector `s`: a magic, the id,
/// the sector, then bytes derived from both, so any sector of any write is
/// recognised where it lands and a misplaced sector is not.
pub fn stamp(sec: &mut [u8], id: u64, s: u64) {
    sec[..4].copy_from_slice(b"DSWR");
    sec[4..12].copy_from_slice(&id.to_le_bytes());
    sec[12..20].copy_from_slice(&s.to_le_bytes());
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ s.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    for b in sec[20..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Stamped data for write `id` covering `len` bytes at `offset`.
pub fn stamped(id: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let s0 = offset / SECTOR as u64;
    for (i, sec) in v.chunks_mut(SECTOR).enumerate() {
        stamp(sec, id, s0 + i as u64);
    }
    v
}

/// The write id whose stamp `sec` (sector `s`) carries, if it is a whole,
/// well-placed stamp.
pub fn stamp_of(sec: &[u8], s: u64) -> Option<u64> {
    if &sec[..4] != b"DSWR" {
        return None;
    }
    let id = u64::from_le_bytes(sec[4..12].try_into().unwrap());
    let mut want = [0u8; SECTOR];
    stamp(&mut want, id, s);
    (want[..] == sec[..]).then_some(id)
}

/// What a guest did: every write issued (acknowledged or not), and which of
/// them an acknowledged flush made durable.
#[derive(Clone, Debug, Default)]
pub struct Journal {
    /// Per sector: the ids of the writes issued to it, in issue order.
    pub issued: Vec<Vec<u64>>,
    /// Per sector: the newest write a completed flush covered.
    pub durable: Vec<Option<u64>>,
    /// Writes issued and acknowledged since the last flush.
    pending: Vec<(u64, u64, usize)>,
    pub writes_acked: u64,
    pub flushes: u64,
    /// The write sent and not yet answered (one writer: at most one).
    pub in_flight: Option<(u64, usize)>,
}

/// Verdict of comparing an image's content with a [`Journal`].
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Sectors holding data never written there (neither the base's nor any
    /// issued write's).
    pub foreign: u64,
    /// Sectors whose acknowledged-and-flushed write is gone (older data).
    pub lost: u64,
    pub first_problem: Option<String>,
}

impl Journal {
    pub fn new(size: usize) -> Self {
        let n = size / SECTOR;
        Journal {
            issued: vec![Vec::new(); n],
            durable: vec![None; n],
            ..Journal::default()
        }
    }

    /// Records a write as issued (before it is sent).
    pub fn issue(&mut self, id: u64, offset: u64, len: usize) {
        let s0 = (offset / SECTOR as u64) as usize;
        for s in s0..s0 + len / SECTOR {
            self.issued[s].push(id);
        }
        self.in_flight = Some((offset, len));
    }

    pub fn acked(&mut self, id: u64, offset: u64, len: usize) {
        self.in_flight = None;
        self.writes_acked += 1;
        self.pending.push((id, offset, len));
    }

    /// A flush returned success: every write acknowledged before it is
    /// durable.
    pub fn flushed(&mut self) {
        self.flushes += 1;
        for (id, offset, len) in self.pending.drain(..) {
            let s0 = (offset / SECTOR as u64) as usize;
            for d in &mut self.durable[s0..s0 + len / SECTOR] {
                *d = Some(d.map_or(id, |o: u64| o.max(id)));
            }
        }
    }

    /// Checks `data` (the image read at `offset`) against the journal:
    /// each sector is the base's or some issued write's to that sector, and
    /// not older than the newest durable write there.
    pub fn check(&self, base: &[u8], offset: u64, data: &[u8], v: &mut Verdict) {
        self.check_skipping(base, offset, data, v, None);
    }

    /// [`Journal::check`] of a read that raced the write `skip` (offset,
    /// length): a read overlapping a write in flight may see any mix of
    /// old and new bytes (NBD, like a disk, promises nothing there), so
    /// those sectors are not judged.
    pub fn check_skipping(
        &self,
        base: &[u8],
        offset: u64,
        data: &[u8],
        v: &mut Verdict,
        skip: Option<(u64, usize)>,
    ) {
        let s0 = (offset / SECTOR as u64) as usize;
        for (i, sec) in data.chunks(SECTOR).enumerate() {
            let s = s0 + i;
            if let Some((o, l)) = skip {
                let a = (o / SECTOR as u64) as usize;
                if (a..a + l / SECTOR).contains(&s) {
                    continue;
                }
            }
            let from = if sec == &base[s * SECTOR..(s + 1) * SECTOR] {
                None
            } else {
                match stamp_of(sec, s as u64).filter(|id| self.issued[s].contains(id)) {
                    Some(id) => Some(id),
                    None => {
                        v.foreign += 1;
                        v.first_problem
                            .get_or_insert_with(|| format!("sector {s}: data never written there"));
                        continue;
                    }
                }
            };
            if let Some(d) = self.durable[s] {
                // Writes to one sector are issued in id order by one writer,
                // so anything at or after the durable one is allowed.
                if from.is_none_or(|id| id < d) {
                    v.lost += 1;
                    v.first_problem.get_or_insert_with(|| {
                        format!("sector {s}: flushed write {d} lost (reads {from:?})")
                    });
                }
            }
        }
    }
}

/// A running `diskstream daemon`, killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
}

impl Daemon {
    /// Starts a daemon with its QMP socket and NBD server socket in `dir`.
    pub fn start(dir: &Path) -> Daemon {
        let qmp = dir.join("qmp.sock");
        let nbd = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&qmp);
        let _ = std::fs::remove_file(&nbd);
        let mut child = Command::new(bin())
            .arg("daemon")
            .arg("--qmp")
            .arg(&qmp)
            .arg("--nbd")
            .arg(format!("unix:{}", nbd.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start diskstream daemon");
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while !(qmp.exists() && nbd.exists()) {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("daemon exited early: {st}");
            }
            assert!(
                std::time::Instant::now() < end,
                "daemon sockets never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, qmp, nbd }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.qmp).await.expect("QMP connect")
    }

    /// `nbd+unix` URI of the export named `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd.display())
    }

    /// SIGKILL, and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident set (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// `quit` over QMP and wait (bounded) for the exit.
    pub async fn quit(mut self, c: &mut Client) {
        let _ = c.execute("quit", json!({})).await;
        let end = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "daemon exit status {st}");
                return;
            }
            assert!(std::time::Instant::now() < end, "daemon did not quit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `blockdev-add` of `path` as node `node` of `case`'s format.
pub async fn add_node(c: &mut Client, case: &Case, node: &str, path: &Path, cor: bool) {
    let mut args = json!({
        "driver": case.format,
        "node-name": node,
        "file": {"driver": "file", "filename": path.to_str().unwrap()},
    });
    if cor {
        args["__com.diskstream_copy-on-read"] = json!(true);
    }
    c.execute("blockdev-add", args)
        .await
        .unwrap_or_else(|e| panic!("blockdev-add {}: {e}", path.display()));
}

/// A writable NBD export of `node`, named after it.
pub async fn export(c: &mut Client, node: &str) {
    c.execute(
        "block-export-add",
        json!({"type": "nbd", "id": format!("e-{node}"), "node-name": node, "writable": true}),
    )
    .await
    .unwrap_or_else(|e| panic!("block-export-add {node}: {e}"));
}

/// Waits (bounded) for `BLOCK_JOB_COMPLETED` of job `id`; returns its data.
pub async fn wait_completed(c: &mut Client, id: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        match c.next_event(deadline).await.expect("QMP events") {
            Some(ClientEvent { name, data })
                if name == "BLOCK_JOB_COMPLETED" && data["device"] == id =>
            {
                return data;
            }
            Some(_) => {}
            None => panic!("job {id}: no BLOCK_JOB_COMPLETED within {limit:?}"),
        }
    }
}

/// Waits (bounded) for `BLOCK_JOB_COMPLETED` of every job in `ids`, in
/// any order; returns their data in the order of `ids`.
pub async fn wait_all_completed(c: &mut Client, ids: &[String], limit: Duration) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut got: Vec<Option<Value>> = vec![None; ids.len()];
    while got.iter().any(Option::is_none) {
        match c.next_event(deadline).await.expect("QMP events") {
            Some(ClientEvent { name, data }) if name == "BLOCK_JOB_COMPLETED" => {
                if let Some(i) = ids.iter().position(|id| data["device"] == id.as_str()) {
                    got[i] = Some(data);
                }
            }
            Some(_) => {}
            None => panic!("jobs {ids:?}: not all completed within {limit:?}: {got:?}"),
        }
    }
    got.into_iter().map(Option::unwrap).collect()
}

/// Waits (bounded) for an event `name` whose data satisfies `pred`.
pub async fn wait_event(
    c: &mut Client,
    name: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        match c.next_event(deadline).await.expect("QMP events") {
            Some(ev) if ev.name == name && pred(&ev.data) => return ev.data,
            Some(_) => {}
            None => panic!("no {name} event within {limit:?}"),
        }
    }
}

/// `qemu-img check` exit code (0 clean, 2 corruption, 3 leaks only) and
/// its output. A format qemu-img has no checker for (raw) counts as clean:
/// there is no metadata to be inconsistent.
pub fn qemu_img_check(case: &Case, img: &Path) -> (i32, String) {
    if case.format == "raw" {
        return (0, String::new());
    }
    let out = Command::new("qemu-img")
        .args(["check", "-f", case.format, img.to_str().unwrap()])
        .output()
        .expect("qemu-img check");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The image's guest-visible content, read by qemu-img (through its chain).
pub fn qemu_read_all(case: &Case, img: &Path, scratch: &Path) -> Vec<u8> {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-f",
            case.format,
            "-O",
            "raw",
            img.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    );
    let v = std::fs::read(scratch).unwrap();
    let _ = std::fs::remove_file(scratch);
    v
}

/// Whether `img` still names a backing file (qemu-img info).
pub fn has_backing(img: &Path) -> bool {
    let out = run_ok(
        "qemu-img",
        &["info", "-U", "--output", "json", img.to_str().unwrap()],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v.get("backing-filename").is_some()
}
