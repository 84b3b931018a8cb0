//! Ignored benchmark: writing 1 GiB in 1 MiB runs into a new qcow2 image,
//! against `qemu-img convert -O qcow2` of the same data in the same run.
//! Run with `cargo test --release -p diskstream-image --test qcow2_bench --
//! --ignored --nocapture`; prints `name=value` lines, asserts no timing.

use std::io::Read;
use std::time::Instant;

use bytes::Bytes;
use image::{BlockDevice, CreateOptions, FormatKind, OpenOptions, WriteFlags};

#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn bench_write_1g_in_1m_runs() {
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or("/tmp".into())).unwrap();
    let src = dir.path().join("src.raw");
    let size: u64 = 1 << 30;
    {
        let mut chunk = vec![0u8; 1 << 20];
        let mut f = std::fs::File::create(&src).unwrap();
        for i in 0..(size >> 20) {
            chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i as usize + j) as u8 | 1);
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let t = Instant::now();
    let q = dir.path().join("qemu.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "qcow2",
            src.to_str().unwrap(),
            q.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    println!("qemu_img_convert_secs={:.3}", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let ours = dir.path().join("ours.qcow2");
    image::create(
        &ours,
        FormatKind::Qcow2,
        &CreateOptions {
            size: Some(size),
            ..CreateOptions::default()
        },
    )
    .await
    .unwrap();
    let img = image::open(
        &ours,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )
    .await
    .unwrap();
    let mut f = std::fs::File::open(&src).unwrap();
    let mut pending = Vec::new();
    for i in 0..(size >> 20) {
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact(&mut buf).unwrap();
        let img = img.clone();
        pending.push(tokio::spawn(async move {
            img.write(i << 20, Bytes::from(buf), WriteFlags::default())
                .await
                .unwrap()
        }));
        if pending.len() >= 8 {
            pending.remove(0).await.unwrap();
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    println!(
        "diskstream_qcow2_writes_done_secs={:.3}",
        t.elapsed().as_secs_f64()
    );
    img.flush().await.unwrap();
    img.close().await.unwrap();
    println!(
        "diskstream_qcow2_write_secs={:.3}",
        t.elapsed().as_secs_f64()
    );
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-q", q.to_str().unwrap(), ours.to_str().unwrap()])
        .status()
        .unwrap();
    println!("identical={}", out.success());
}
