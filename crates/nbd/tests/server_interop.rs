//! Our server driven by the real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy and fio's nbd engine. Results are compared byte for byte with
//! the image file behind the export.

mod common;

use std::time::Duration;

use common::*;
use image::ExtentKind;
use nbd::server::ServerConfig;

const MIB: u64 = 1 << 20;

fn raw_served(read_only: bool) -> (Served, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let content = sparse_raw(&path, 16 * MIB, 3 * MIB, 2 * MIB as usize + 4096);
    let p = path.clone();
    let s = serve(
        move || async move { ServerConfig::new(vec![image_export(&p, "", read_only).await]) },
    );
    // Keep the image directory alive as long as the server.
    let keep = s.dir.path().join("image");
    std::fs::rename(dir.keep(), &keep).unwrap();
    (s, keep.join("disk.raw"), content)
}

#[test]
fn qemu_img_info_compare_and_map_agree_with_the_file() {
    let (mut s, path, _) = raw_served(true);
    let uri = s.uri("");
    let info = tool_ok(30, "qemu-img", &["info", "--output=json", &uri]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    let cmp = tool_ok(
        30,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            path.to_str().unwrap(),
            &uri,
        ],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    // The allocation map over NBD equals the file's (data vs zero runs).
    let key = |json: &str| -> Vec<(u64, u64, bool, bool)> {
        let v: Vec<serde_like::Map> = serde_like::parse(json);
        v.into_iter()
            .map(|m| (m.start, m.length, m.zero, m.data))
            .collect()
    };
    let over_nbd = tool_ok(30, "qemu-img", &["map", "-f", "raw", "--output=json", &uri]);
    let local = tool_ok(
        30,
        "qemu-img",
        &["map", "-f", "raw", "--output=json", path.to_str().unwrap()],
    );
    assert_eq!(
        key(&over_nbd),
        key(&local),
        "nbd:\n{over_nbd}\nlocal:\n{local}"
    );
    s.stop().unwrap();
}

/// A tiny reader for qemu-img map's JSON lines (no serde_json dependency here).
mod serde_like {
    pub struct Map {
        pub start: u64,
        pub length: u64,
        pub zero: bool,
        pub data: bool,
    }
    fn field<'a>(obj: &'a str, name: &str) -> &'a str {
        let k = format!("\"{name}\": ");
        let i = obj.find(&k).unwrap_or_else(|| panic!("no {name} in {obj}")) + k.len();
        let rest = &obj[i..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim()
    }
    pub fn parse(json: &str) -> Vec<Map> {
        json.split('{')
            .skip(1)
            .map(|o| Map {
                start: field(o, "start").parse().unwrap(),
                length: field(o, "length").parse().unwrap(),
                zero: field(o, "zero") == "true",
                data: field(o, "data") == "true",
            })
            .collect()
    }
}

#[test]
fn qemu_io_writes_land_in_the_file_and_read_back() {
    let (mut s, path, mut content) = raw_served(false);
    let uri = s.uri("");
    tool_ok(
        30,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1048576 65536",
            "-c",
            "write -z 3145728 4096",
            "-c",
            "write -P 0x11 16773120 4096",
            "-c",
            "read -P 0x5a 1048576 65536",
            "-c",
            "read -P 0 3145728 4096",
            "-c",
            "read -P 0x11 16773120 4096",
            "-c",
            "flush",
            &uri,
        ],
    );
    content[MIB as usize..MIB as usize + 65536].fill(0x5a);
    content[3 * MIB as usize..3 * MIB as usize + 4096].fill(0);
    content[16 * MIB as usize - 4096..].fill(0x11);
    s.stop().unwrap();
    assert!(
        std::fs::read(&path).unwrap() == content,
        "file differs from the writes"
    );
}

#[test]
fn nbdinfo_reports_size_map_depth_flags_and_list() {
    let (mut s, _path, _) = raw_served(true);
    let uri = s.uri("");
    assert_eq!(tool_ok(30, "nbdinfo", &["--size", &uri]).trim(), "16777216");
    let map = tool_ok(30, "nbdinfo", &["--map", &uri]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expect = [
        ("0", "3145728", "3"),
        ("3145728", "2101248", "0"),
        ("5246976", "11530240", "3"),
    ];
    assert_eq!(rows.len(), expect.len(), "{map}");
    for (r, e) in rows.iter().zip(expect) {
        assert_eq!((r[0], r[1], r[2]), e, "{map}");
    }
    let depth = tool_ok(30, "nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    assert_eq!(
        depth.split_whitespace().take(3).collect::<Vec<_>>(),
        ["0", "16777216", "1"],
        "{depth}"
    );
    assert!(
        tool(30, "nbdinfo", &["--is", "read-only", &uri])
            .status
            .success()
    );
    assert!(
        tool(30, "nbdinfo", &["--can", "multi-conn", &uri])
            .status
            .success()
    );
    assert!(
        tool(30, "nbdinfo", &["--can", "cache", &uri])
            .status
            .success()
    );
    assert_eq!(
        tool(30, "nbdinfo", &["--can", "trim", &uri]).status.code(),
        Some(2)
    );
    let list = tool_ok(30, "nbdinfo", &["--list", &uri]);
    assert!(list.contains("export=\"\""), "{list}");
    assert!(list.contains("description: test image"), "{list}");
    s.stop().unwrap();
}

#[test]
fn writable_export_advertises_write_flags() {
    let (mut s, _path, _) = raw_served(false);
    let uri = s.uri("");
    for flag in [
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "df",
    ] {
        let o = tool(30, "nbdinfo", &["--can", flag, &uri]);
        assert!(o.status.success(), "can {flag}: {o:?}");
    }
    assert_eq!(
        tool(30, "nbdinfo", &["--is", "read-only", &uri])
            .status
            .code(),
        Some(2)
    );
    s.stop().unwrap();
}

#[test]
fn allocation_depth_and_base_allocation_follow_extents() {
    use std::sync::Arc;
    let size = 4 * MIB;
    let exts = vec![
        extent(0, MIB, ExtentKind::Data, Some(0)),
        extent(MIB, MIB, ExtentKind::Data, Some(1)),
        extent(2 * MIB, MIB, ExtentKind::Zero, Some(0)),
        extent(3 * MIB, MIB, ExtentKind::Hole, None),
    ];
    let dev = Arc::new(MemDevice::new(vec![0; size as usize], exts));
    let mut s =
        serve(move || async move { ServerConfig::new(vec![mem_export("chain", dev, true)]) });
    let uri = s.uri("chain");
    let depth = tool_ok(30, "nbdinfo", &["--map=qemu:allocation-depth", &uri]);
    let got: Vec<Vec<&str>> = depth
        .lines()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(
        got,
        vec![
            vec!["0", "1048576", "1"],
            vec!["1048576", "1048576", "2"],
            vec!["2097152", "1048576", "1"],
            vec!["3145728", "1048576", "0"],
        ],
        "{depth}"
    );
    let base = tool_ok(30, "nbdinfo", &["--map", &uri]);
    let got: Vec<Vec<&str>> = base
        .lines()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(
        got,
        vec![vec!["0", "2097152", "0"], vec!["2097152", "2097152", "3"]],
        "{base}"
    );
    s.stop().unwrap();
}

#[test]
fn nbdcopy_both_directions_is_byte_exact() {
    let (mut s, path, content) = raw_served(false);
    let uri = s.uri("");
    let out = s.dir.path().join("copy.raw");
    tool_ok(60, "nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == content,
        "nbdcopy from the export differs"
    );
    // And back: a different pattern into the export.
    let src = s.dir.path().join("src.raw");
    let fresh = pattern(16 * MIB as usize, 99);
    std::fs::write(&src, &fresh).unwrap();
    tool_ok(60, "nbdcopy", &[src.to_str().unwrap(), &uri]);
    s.stop().unwrap();
    assert!(
        std::fs::read(&path).unwrap() == fresh,
        "nbdcopy into the export differs"
    );
}

#[test]
fn fio_random_read_write_with_verify() {
    if !have("fio") {
        panic!("fio is required (scripts/test installs it)");
    }
    let (mut s, _path, _) = raw_served(false);
    let uri = s.uri("");
    let out = tool_ok(
        90,
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--size=16m",
            "--time_based",
            "--runtime=2",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    );
    assert!(!out.is_empty());
    // The export is still healthy afterwards.
    tool_ok(30, "qemu-img", &["info", &uri]);
    s.stop().unwrap();
}

#[test]
fn non_persistent_server_exits_after_last_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.raw");
    sparse_raw(&path, MIB, 0, 4096);
    let p = path.clone();
    let mut s = serve(move || async move {
        let mut c = ServerConfig::new(vec![image_export(&p, "", true).await]);
        c.persistent = false;
        c
    });
    tool_ok(30, "nbdinfo", &["--size", &s.uri("")]);
    s.wait_exit(Duration::from_secs(10)).unwrap();
}

/// A qcow2 overlay on a raw backing: our `base:allocation` and
/// `qemu:allocation-depth` maps equal qemu-nbd's for the same image.
#[test]
fn block_status_of_a_qcow2_chain_matches_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(&base, 16 * MIB, 3 * MIB, 2 * MIB as usize);
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    tool_ok(
        30,
        "qemu-img",
        &["create", "-f", "qcow2", "-b", b, "-F", "raw", t],
    );
    tool_ok(
        30,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "write -P 2 10M 64k",
            t,
        ],
    );
    let maps = |uri: &str| {
        (
            tool_ok(30, "nbdinfo", &["--map", uri]),
            tool_ok(30, "nbdinfo", &["--map=qemu:allocation-depth", uri]),
        )
    };
    let qsock = dir.path().join("q.sock");
    /// Kills qemu-nbd even when an assertion fails.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let q = Kill(
        std::process::Command::new("qemu-nbd")
            .args([
                "-A",
                "-r",
                "-f",
                "qcow2",
                "--persistent",
                "-k",
                qsock.to_str().unwrap(),
                t,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_socket(&qsock, Duration::from_secs(20));
    let theirs = maps(&format!("nbd+unix:///?socket={}", qsock.display()));
    drop(q);
    let top2 = top.clone();
    let mut s = serve(move || async move {
        let opts = image::OpenOptions {
            format: Some("qcow2".into()),
            ..Default::default()
        };
        let img = image::open(&top2, &opts).await.unwrap();
        ServerConfig::new(vec![nbd::server::Export {
            name: String::new(),
            description: String::new(),
            device: img,
            read_only: true,
            multi_conn: true,
        }])
    });
    let ours = maps(&s.uri(""));
    s.stop().unwrap();
    assert_eq!(ours.0, theirs.0, "base:allocation differs");
    assert_eq!(ours.1, theirs.1, "qemu:allocation-depth differs");
}
