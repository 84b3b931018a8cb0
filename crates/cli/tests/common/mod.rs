//! Helpers shared by the CLI integration tests: run the `diskstream` binary
//! and the real QEMU tools in a temporary directory, and hold an image open
//! in a QEMU process to test locking.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Dir {
    pub dir: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Dir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

/// Runs diskstream with `args` (in the test directory).
pub fn ds(d: &Dir, args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_diskstream"))
        .args(args)
        .current_dir(d.dir.path()))
}

/// Runs diskstream and asserts success; returns stdout.
pub fn ds_ok(d: &Dir, args: &[&str]) -> String {
    let o = ds(d, args);
    assert!(
        o.status.success(),
        "diskstream {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf8")
}

/// Runs a QEMU tool in the test directory.
pub fn qemu(d: &Dir, tool: &str, args: &[&str]) -> Output {
    run(Command::new(tool).args(args).current_dir(d.dir.path()))
}

/// Runs a QEMU tool and asserts success; returns stdout.
pub fn qemu_ok(d: &Dir, tool: &str, args: &[&str]) -> String {
    let o = qemu(d, tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf8")
}

/// qemu-io commands against an image (`-c` each).
pub fn qemu_io(d: &Dir, fmt: &str, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    qemu_ok(d, "qemu-io", &args);
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A QEMU process holding an image open until dropped.
pub struct Holder {
    child: Child,
}

impl Holder {
    /// Starts `tool args` (qemu-io reading commands from a pipe that stays
    /// open, or qemu-nbd) and waits until it holds lock byte 100 of `img`.
    pub fn start(d: &Dir, tool: &str, args: &[&str], img: &Path) -> Self {
        let child = Command::new(tool)
            .args(args)
            .current_dir(d.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn holder");
        let h = Holder { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_qemu_lock(img) {
            assert!(
                Instant::now() < deadline,
                "{tool} did not lock {}",
                img.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether some process holds an OFD lock on byte 100 of `img` (/proc/locks).
pub fn has_qemu_lock(img: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(img).map(|m| m.ino()) else {
        return false;
    };
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[1] == "OFDLCK" && f[5].rsplit(':').next() == Some(&ino.to_string()) && {
            let (s, e) = (
                f[6].parse::<u64>().unwrap_or(0),
                f[7].parse::<u64>().unwrap_or(0),
            );
            s <= 100 && 100 <= e
        }
    })
}

/// Hash of a file's bytes, to show that a failed command changed nothing.
pub fn digest(p: &Path) -> Option<(u64, Vec<u8>)> {
    let b = std::fs::read(p).ok()?;
    let mut h: u64 = 0xcbf29ce484222325;
    for x in &b {
        h = (h ^ *x as u64).wrapping_mul(0x100000001b3);
    }
    Some((b.len() as u64, h.to_le_bytes().to_vec()))
}
