//! Full disk: the top image lives on a tmpfs mounted by the test with a
//! size limit (we run as root; where mounting is not allowed the test says
//! so and the injected-ENOSPC daemon tests in `crates/daemon/tests/jobs.rs`,
//! `on_error_enospc_*`, cover the engine). A `block-stream` with
//! `on-error=stop` or `enospc` runs out of space: the job pauses with
//! `BLOCK_JOB_ERROR` and io-status `nospace`, guest writes that need new
//! space get ENOSPC over NBD while local data still reads, and after space
//! is freed the job resumes and completes; `qemu-img check` is clean and the
//! content is the base plus the guest's writes.

mod reliab;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use image::{BlockDevice, ErrorKind, WriteFlags};
use nbd::client::{ClientOptions, NbdClient};
use reliab::*;
use serde_json::json;

const SIZE: usize = 16 << 20;

/// A size-limited tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

async fn full_disk_case(case: &Case, policy: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "20m") else {
        println!("full_disk.mode=injected (mount -t tmpfs not allowed here)");
        return false;
    };
    let basep = dir.path().join("base.raw");
    let base = base_content(SIZE);
    write_base(&basep, &base);
    let top = fs.0.join(format!("top.{}", case.format));
    create_top(case, &basep, &top, SIZE as u64);
    // Leave about 8 MiB free for 12 MiB of data to stream.
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![1u8; 12 << 20]).unwrap();

    let d = Daemon::start(dir.path());
    let mut q = d.client().await;
    add_node(&mut q, case, "top", &top, false).await;
    export(&mut q, "top").await;
    let c = NbdClient::connect_uri(&d.uri("top"), ClientOptions::default())
        .await
        .unwrap();
    q.execute(
        "block-stream",
        json!({"device": "top", "on-error": policy, "__com.diskstream_chunk-size": 65536}),
    )
    .await
    .unwrap();
    let err = wait_event(&mut q, "BLOCK_JOB_ERROR", Duration::from_secs(60), |_| true).await;
    assert_eq!(
        err,
        json!({"device": "top", "operation": "write", "action": "stop"}),
        "{policy}"
    );
    wait_event(&mut q, "JOB_STATUS_CHANGE", Duration::from_secs(30), |d| {
        d["status"] == "paused"
    })
    .await;
    let jobs = q.execute("query-block-jobs", json!({})).await.unwrap();
    assert_eq!(jobs[0]["io-status"], "nospace", "{jobs}");
    assert_eq!(jobs[0]["status"], "paused", "{jobs}");

    // The guest: a write that needs new space fails with ENOSPC; local data
    // (the start, streamed first) still reads.
    let off = (SIZE - (1 << 20)) as u64;
    let data = stamped(1, off, 65536);
    let e = c
        .write(off, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .expect_err("a guest write on a full disk must fail");
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    let head = c.read(0, 65536).await.unwrap();
    assert_eq!(head, base[..65536]);

    // Space comes back: resume, the job completes, the write now works.
    std::fs::remove_file(&ballast).unwrap();
    q.execute("block-job-resume", json!({"device": "top"}))
        .await
        .unwrap();
    c.write(off, Bytes::from(data.clone()), WriteFlags::default())
        .await
        .unwrap();
    c.flush().await.unwrap();
    let ev = wait_completed(&mut q, "top", Duration::from_secs(120)).await;
    assert!(ev.get("error").is_none(), "{policy}: {ev}");
    drop(c);
    d.quit(&mut q).await;
    let (code, out) = qemu_img_check(case, &top);
    assert_eq!(code, 0, "{}: qemu-img check: {out}", case.name);
    assert!(!has_backing(&top));
    let mut want = base.clone();
    want[off as usize..off as usize + data.len()].copy_from_slice(&data);
    let got = qemu_read_all(case, &top, &dir.path().join("read.raw"));
    assert!(
        got == want,
        "{}: content after the resumed stream",
        case.name
    );
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_pauses_the_stream_fails_guest_writes_and_resumes_when_freed() {
    let mut survived = 0;
    for case in overlay_cases() {
        for policy in ["stop", "enospc"] {
            if !full_disk_case(&case, policy).await {
                return;
            }
            survived += 1;
            println!("full_disk.{}.{policy}=ok", case.name);
        }
    }
    println!("full_disk.mode=tmpfs");
    println!("full_disk.cases={survived}");
}
