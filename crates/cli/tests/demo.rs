//! `diskstream demo` runs with no setup and proves its own result: the
//! report's checksums match, qemu-img compares the deployed image identical
//! to the base and checks it clean, every data byte came over exactly once
//! (on demand or streamed), and the work directory is gone afterwards.

use std::process::Command;

use serde_json::Value;

#[test]
fn demo_reports_a_verified_deployment_and_cleans_up() {
    let o = Command::new("timeout")
        .args(["-k", "5", "300", env!("CARGO_BIN_EXE_diskstream")])
        .args(["demo", "--size", "64M", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "demo failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r: Value = serde_json::from_slice(&o.stdout).expect("one JSON report");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["checksum-source"], r["checksum-result"], "{r}");
    assert_eq!(r["qemu-img-compare"], "identical", "{r}");
    assert_eq!(r["qemu-img-check"], "clean", "{r}");
    assert_eq!(r["independent"], true, "{r}");
    assert_eq!(r["source-bytes-read-before-ready"], 0, "{r}");
    let data = r["data-bytes"].as_u64().unwrap();
    let fetched = r["on-demand-bytes"].as_u64().unwrap() + r["streamed-bytes"].as_u64().unwrap();
    assert!(data > 0);
    assert_eq!(fetched, data, "each data byte is fetched exactly once: {r}");
    assert!(r["guest-reads"].as_u64().unwrap() > 0);
    assert!(r["read-latency-p50-us"].is_u64(), "{r}");
    let dir = r["dir"].as_str().unwrap();
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
