//! The README's "With QEMU on both ends" sequence, run for real: two
//! `qemu-system-x86_64` VMs (QEMU 7.2 under TCG, from scripts/qemu-system,
//! env DS_QEMU_SYSTEM), the source attached to a `diskstream daemon` over
//! NBD, the destination to `migrate receive --serve`, RAM moved by QEMU's
//! own migration. No guest OS: SeaBIOS reads the disk's boot sector and
//! idles, which is enough for the RAM migration and the NBD attachment.
//! Also the README's "Rapid deployment" with a VM attached to `deploy`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Dir, ds_ok, qemu_ok};
use serde_json::{Value, json};

/// Every wait in this test is bounded by this.
const LIMIT: Duration = Duration::from_secs(60);

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_system() -> String {
    std::env::var("DS_QEMU_SYSTEM").unwrap_or_else(|_| {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        let o = Command::new(format!("{root}/scripts/qemu-system"))
            .output()
            .expect("run scripts/qemu-system");
        assert!(
            o.status.success(),
            "scripts/qemu-system: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    })
}

fn wait_socket(p: &Path) {
    let t = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < LIMIT, "{} never listened", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal QMP client: greeting, capabilities, then one command at a time
/// (events are skipped).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(p: &Path) -> Qmp {
        wait_socket(p);
        let s = UnixStream::connect(p).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.cmd("qmp_capabilities", json!({}));
        q
    }
    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP sent {l:?}: {e}"))
    }
    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let req = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{req}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            assert!(v.get("event").is_some(), "{name} failed: {v}");
        }
    }
}

fn vm(qemu: &str, qmp: &Path, disk_uri: &str, extra: &[&str]) -> Proc {
    let share = Path::new(qemu)
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("share");
    let mut c = Command::new(qemu);
    c.args([
        "-accel",
        "tcg",
        "-display",
        "none",
        "-nodefaults",
        "-m",
        "64",
    ])
    .arg("-L")
    .arg(share.join("seabios"))
    .arg("-L")
    .arg(share.join("qemu"))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .arg("-drive")
    .arg(format!("file={disk_uri},format=raw,if=virtio,cache=none"))
    .args(extra)
    .stdin(Stdio::null());
    Proc(c.spawn().expect("spawn qemu-system-x86_64"))
}

/// JSON events of `migrate receive`, read by a thread.
fn events(child: &mut Child) -> mpsc::Receiver<Value> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON event: {line}: {e}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_event(rx: &mpsc::Receiver<Value>, seen: &mut Vec<Value>, name: &str) -> Value {
    let end = Instant::now() + LIMIT;
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(v) => {
                seen.push(v.clone());
                if v["event"] == name {
                    return v;
                }
            }
            Err(e) => panic!("no '{name}' event ({e}); seen: {seen:?}"),
        }
    }
}

#[test]
fn readme_post_copy_migration_with_two_qemu_vms() {
    let qemu = qemu_system();
    let d = Dir::new();
    let disk = d.s("vm0.qcow2");
    // A disk with a boot sector SeaBIOS reads (not bootable: no 0x55AA, so
    // it idles after "No bootable device") and data further in.
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &disk, "16M"],
    );
    common::qemu_io(
        &d,
        "qcow2",
        &disk,
        &[
            "write -P 0xeb 0 510",
            "write -P 0x5a 1M 2M",
            "write -P 0x77 9M 64k",
        ],
    );
    let ds_qmp = d.path("ds.qmp");
    let (src_vm_qmp, dst_vm_qmp) = (d.path("src-vm.qmp"), d.path("dst-vm.qmp"));
    let (dst_sock, mig) = (d.path("vm0.sock"), d.path("mig.sock"));
    let q = ds_qmp.to_str().unwrap();
    std::fs::create_dir(d.path("dst")).unwrap();

    // The daemon's one NBD server serves both the source VM and, after the
    // switchover, the destination.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    // Source host: the disk in a diskstream daemon, the VM attached over NBD.
    let daemon = Proc(
        Command::new(env!("CARGO_BIN_EXE_diskstream"))
            .args(["daemon", "--qmp", q, "--nbd"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&ds_qmp);
    ds_ok(&d, &["qmp", "--qmp", q, &json!({"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"vm0","file":{"driver":"file","filename":disk}}}).to_string()]);
    ds_ok(
        &d,
        &[
            "qmp",
            "--qmp",
            q,
            r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"vm0","node-name":"vm0","writable":true}}"#,
        ],
    );
    let src_vm = vm(
        &qemu,
        &src_vm_qmp,
        &format!("nbd://127.0.0.1:{port}/vm0"),
        &[],
    );
    let mut src = Qmp::connect(&src_vm_qmp);
    assert_eq!(src.cmd("query-status", json!({}))["status"], "running");

    // Switchover, source host: stop the VM, freeze and export the disk.
    src.cmd("stop", json!({}));
    let out = ds_ok(&d, &["migrate", "send", "--qmp", q, "vm0"]);
    assert!(out.contains("read-only"), "{out}");

    // Destination host: the overlay, served at once; QEMU waiting for RAM.
    let mut recv = Proc(
        Command::new(env!("CARGO_BIN_EXE_diskstream"))
            .args(["migrate", "receive", "--from"])
            .arg(format!("nbd://127.0.0.1:{port}/vm0"))
            .args(["--to", "dst/vm0.qcow2", "--serve"])
            .arg(format!("unix:{}", dst_sock.display()))
            .args(["--verify", "--output", "json", "--speed", "1M"])
            .current_dir(d.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = events(&mut recv.0);
    let mut seen = Vec::new();
    wait_event(&rx, &mut seen, "ready");
    let dst_vm = vm(
        &qemu,
        &dst_vm_qmp,
        &format!("nbd+unix:///vm0?socket={}", dst_sock.display()),
        &["-incoming", &format!("unix:{}", mig.display())],
    );
    let mut dst = Qmp::connect(&dst_vm_qmp);
    assert_eq!(dst.cmd("query-status", json!({}))["status"], "inmigrate");

    // Source: move the RAM; destination: run the VM.
    src.cmd("migrate", json!({"uri": format!("unix:{}", mig.display())}));
    let t = Instant::now();
    loop {
        let s = src.cmd("query-migrate", json!({}));
        match s["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("RAM migration: {s}"),
            _ => {}
        }
        assert!(t.elapsed() < LIMIT, "RAM migration did not complete: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    while dst.cmd("query-status", json!({}))["status"] == "inmigrate" {
        assert!(t.elapsed() < LIMIT, "destination never left inmigrate");
        std::thread::sleep(Duration::from_millis(50));
    }
    dst.cmd("cont", json!({}));
    assert_eq!(dst.cmd("query-status", json!({}))["status"], "running");
    let block = dst.cmd("query-block", json!({}));
    assert!(
        block.to_string().contains(dst_sock.to_str().unwrap()),
        "the destination VM is not attached to the receive export: {block}"
    );

    // The stream finishes and verifies; then the source may stop.
    wait_event(&rx, &mut seen, "verified");
    wait_event(&rx, &mut seen, "complete");
    drop(src);
    drop(src_vm);
    dst.cmd("quit", json!({}));
    drop(dst_vm);
    let end = Instant::now() + LIMIT;
    let st = loop {
        if let Some(s) = recv.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "migrate receive did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "migrate receive failed: {seen:?}");
    // The source may stop now (and releases its image lock).
    drop(daemon);
    let dst_img = d.s("dst/vm0.qcow2");
    qemu_ok(&d, "qemu-img", &["check", &dst_img]);
    let info: Value = serde_json::from_str(&qemu_ok(
        &d,
        "qemu-img",
        &["info", "--output", "json", &dst_img],
    ))
    .unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_ok(&d, "qemu-img", &["compare", &disk, &dst_img]);
}

/// "Rapid deployment" steps 1-4: a repository served over NBD, `deploy
/// --serve unix:...`, a VM attached to the export at once while the stream
/// runs, and an overlay without backing at the end.
#[test]
fn readme_deploy_with_a_qemu_vm_attached() {
    let qemu = qemu_system();
    let d = Dir::new();
    let base = d.s("debian.qcow2");
    qemu_ok(
        &d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &base, "16M"],
    );
    common::qemu_io(
        &d,
        "qcow2",
        &base,
        &["write -P 0xeb 0 510", "write -P 0x33 2M 2M"],
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // 1. The repository.
    let _repo = Proc(
        Command::new(env!("CARGO_BIN_EXE_diskstream"))
            .args([
                "serve",
                "-r",
                "--persistent",
                "-e",
                "64",
                "-x",
                "debian",
                "-b",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg(&base)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < LIMIT, "the repository never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 2. Deploy.
    let sock = d.path("vm0.sock");
    let mut dep = Proc(
        Command::new(env!("CARGO_BIN_EXE_diskstream"))
            .args(["deploy", "--serve"])
            .arg(format!("unix:{}", sock.display()))
            .args(["--speed", "1M", "--output", "json"])
            .arg(format!("nbd://127.0.0.1:{port}/debian"))
            .arg("vm0.qcow2")
            .current_dir(d.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let rx = events(&mut dep.0);
    let mut seen = Vec::new();
    let ready = wait_event(&rx, &mut seen, "ready");
    assert_eq!(ready["source-bytes-read"], 0, "{ready}");
    // 3. Attach the VM at once.
    let vm_qmp = d.path("vm.qmp");
    let _vm = vm(
        &qemu,
        &vm_qmp,
        &format!("nbd+unix:///vm0?socket={}", sock.display()),
        &[],
    );
    let mut q = Qmp::connect(&vm_qmp);
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    let block = q.cmd("query-block", json!({}));
    assert!(
        block.to_string().contains(sock.to_str().unwrap()),
        "the VM is not attached to the deploy export: {block}"
    );
    // 4. The stream completes; deploy keeps serving the VM until SIGTERM.
    wait_event(&rx, &mut seen, "stream-end");
    wait_event(&rx, &mut seen, "serving");
    assert_eq!(q.cmd("query-status", json!({}))["status"], "running");
    q.cmd("quit", json!({}));
    // SAFETY: kill(2) with our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(dep.0.id() as i32, libc::SIGTERM) }, 0);
    let end = Instant::now() + LIMIT;
    let st = loop {
        if let Some(s) = dep.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "deploy did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "deploy failed: {seen:?}");
    let img = d.s("vm0.qcow2");
    qemu_ok(&d, "qemu-img", &["check", &img]);
    let info: Value = serde_json::from_str(&qemu_ok(
        &d,
        "qemu-img",
        &["info", "--output", "json", &img],
    ))
    .unwrap();
    assert!(info.get("backing-filename").is_none(), "{info}");
    qemu_ok(&d, "qemu-img", &["compare", &base, &img]);
}
