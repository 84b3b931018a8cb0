//! More of our server: several exports on one socket (listed, sized and
//! read each from its own device), `CAN_MULTI_CONN` following the export's
//! setting, and the less common commands driven in raw bytes after a GO
//! handshake with structured replies: CACHE, WRITE_ZEROES with FAST_ZERO
//! and NO_HOLE, and READ with DF.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use image::{BlockDevice, DeviceInfo, Extent, ExtentKind, WriteFlags};
use nbd::codec::*;
use nbd::server::{Export, MAX_PAYLOAD, ServerConfig};

const MIB: u64 = 1 << 20;

/// A memory device (fully allocated data) that records what reached it.
#[derive(Debug)]
struct Recording {
    mem: MemDevice,
    /// `(offset, len)` of every read.
    reads: Mutex<Vec<(u64, usize)>>,
    /// `(offset, len, may_unmap)` of every write_zeroes.
    zeroes: Mutex<Vec<(u64, u64, bool)>>,
}

impl Recording {
    fn new(data: Vec<u8>) -> Self {
        let len = data.len() as u64;
        Recording {
            mem: MemDevice::new(data, vec![extent(0, len, ExtentKind::Data, Some(0))]),
            reads: Mutex::new(Vec::new()),
            zeroes: Mutex::new(Vec::new()),
        }
    }
    fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        self.mem.data.lock().unwrap()[off as usize..off as usize + len].to_vec()
    }
}

#[async_trait]
impl BlockDevice for Recording {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn info(&self) -> DeviceInfo {
        self.mem.info()
    }
    async fn read(&self, offset: u64, len: usize) -> image::Result<Vec<u8>> {
        self.reads.lock().unwrap().push((offset, len));
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, f: WriteFlags) -> image::Result<()> {
        self.mem.write(offset, data, f).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> image::Result<()> {
        self.zeroes.lock().unwrap().push((offset, len, unmap));
        self.mem.write_zeroes(offset, len, unmap).await
    }
    async fn discard(&self, offset: u64, len: u64) -> image::Result<()> {
        self.mem.discard(offset, len).await
    }
    async fn flush(&self) -> image::Result<()> {
        self.mem.flush().await
    }
    async fn block_status(&self, offset: u64, len: u64) -> image::Result<Vec<Extent>> {
        self.mem.block_status(offset, len).await
    }
}

fn export(name: &str, dev: Arc<dyn BlockDevice>, read_only: bool, multi_conn: bool) -> Export {
    Export {
        name: name.into(),
        description: format!("export {name}"),
        device: dev,
        read_only,
        multi_conn,
    }
}

/// A memory device whose block status says "all data" (nbdcopy asks).
fn data_dev(data: Vec<u8>) -> Arc<MemDevice> {
    let len = data.len() as u64;
    Arc::new(MemDevice::new(
        data,
        vec![extent(0, len, ExtentKind::Data, Some(0))],
    ))
}

// ---- raw protocol --------------------------------------------------------

fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    c.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    b
}

fn option_reply(c: &mut UnixStream) -> OptionReply {
    let h = read_n(c, 20);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut all = h;
    all.extend(read_n(c, len));
    decode_option_reply(&all).unwrap().0
}

/// A raw connection in transmission with structured replies on.
struct Raw {
    c: UnixStream,
    size: u64,
    flags: u16,
    next_cookie: u64,
}

/// Greeting, STRUCTURED_REPLY, then GO for `name`; returns the export's
/// size and transmission flags from the INFO_EXPORT reply.
fn go(s: &Served, name: &str) -> Raw {
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let g = read_n(&mut c, 18);
    assert_eq!(
        decode_greeting(&g).unwrap().0,
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    let mut b = Vec::new();
    encode_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, &mut b);
    encode_opt(&Opt::StructuredReply, &mut b);
    c.write_all(&b).unwrap();
    let r = option_reply(&mut c);
    assert_eq!((r.option, r.reply), (OPT_STRUCTURED_REPLY, OptReply::Ack));
    let mut b = Vec::new();
    encode_opt(
        &Opt::Go {
            name: name.into(),
            requests: vec![],
        },
        &mut b,
    );
    c.write_all(&b).unwrap();
    let mut export = None;
    loop {
        let r = option_reply(&mut c);
        assert_eq!(r.option, OPT_GO);
        match r.reply {
            OptReply::Ack => break,
            OptReply::Info(InfoItem::Export { size, flags }) => export = Some((size, flags)),
            OptReply::Info(_) => {}
            other => panic!("GO {name:?}: unexpected reply {other:?}"),
        }
    }
    let (size, flags) = export.expect("GO without NBD_INFO_EXPORT");
    Raw {
        c,
        size,
        flags,
        next_cookie: 1,
    }
}

/// One reply: every chunk for the cookie (a simple reply shows as an error
/// code and no chunks).
#[derive(Debug)]
struct Answer {
    /// The error of a simple reply or of the error chunk, 0 on success.
    error: u32,
    chunks: Vec<(bool, Chunk)>,
    simple: bool,
}

impl Raw {
    fn send(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Vec::new();
        encode_request(
            &Request {
                flags,
                command,
                cookie,
                offset,
                length,
            },
            &mut b,
        );
        b.extend_from_slice(payload);
        self.c.write_all(&b).unwrap();
        cookie
    }

    /// Reads frames until the reply to `cookie` is complete. A simple reply
    /// is allowed only for commands other than READ, so it never carries
    /// data here.
    fn answer(&mut self, cookie: u64) -> Answer {
        let mut chunks = Vec::new();
        loop {
            let magic = read_n(&mut self.c, 4);
            let m = u32::from_be_bytes(magic[..].try_into().unwrap());
            let frame = match m {
                SIMPLE_REPLY_MAGIC => {
                    let mut f = magic;
                    f.extend(read_n(&mut self.c, SIMPLE_REPLY_LEN - 4));
                    f
                }
                STRUCTURED_REPLY_MAGIC => {
                    let mut f = magic;
                    f.extend(read_n(&mut self.c, CHUNK_HEADER_LEN - 4));
                    let len = u32::from_be_bytes(f[16..20].try_into().unwrap());
                    f.extend(read_n(&mut self.c, len as usize));
                    f
                }
                other => panic!("bad reply magic {other:#x}"),
            };
            let (reply, used) = decode_reply(&frame, MAX_PAYLOAD, |_| Some(0)).unwrap();
            assert_eq!(used, frame.len());
            match reply {
                Reply::Simple {
                    cookie: c, error, ..
                } => {
                    assert_eq!(c, cookie, "reply to another request");
                    assert!(chunks.is_empty(), "simple reply after chunks");
                    return Answer {
                        error,
                        chunks,
                        simple: true,
                    };
                }
                Reply::Chunk {
                    cookie: c,
                    done,
                    chunk,
                } => {
                    assert_eq!(c, cookie, "chunk for another request");
                    chunks.push((done, chunk));
                    if done {
                        let error = chunks
                            .iter()
                            .find_map(|(_, ch)| match ch {
                                Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => {
                                    Some(*error)
                                }
                                _ => None,
                            })
                            .unwrap_or(0);
                        return Answer {
                            error,
                            chunks,
                            simple: false,
                        };
                    }
                }
            }
        }
    }

    fn call(&mut self, command: Command, flags: u16, offset: u64, length: u32) -> Answer {
        let cookie = self.send(command, flags, offset, length, &[]);
        self.answer(cookie)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let cookie = self.send(Command::Write, 0, offset, data.len() as u32, data);
        assert_eq!(self.answer(cookie).error, 0, "write at {offset}");
    }

    /// A structured READ; returns the data chunks as (offset, data) and
    /// asserts the reply carries no error.
    fn read(&mut self, flags: u16, offset: u64, length: u32) -> Vec<(u64, Vec<u8>)> {
        let a = self.call(Command::Read, flags, offset, length);
        assert!(!a.simple, "simple reply to a structured READ: {a:?}");
        assert_eq!(a.error, 0, "READ {offset}+{length}: {a:?}");
        a.chunks
            .into_iter()
            .filter_map(|(_, ch)| match ch {
                Chunk::OffsetData { offset, data } => Some((offset, data)),
                Chunk::None => None,
                other => panic!("unexpected chunk in a READ reply: {other:?}"),
            })
            .collect()
    }

    /// Reads a range (any chunking) and reassembles it.
    fn read_all(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let mut out = vec![0xeeu8; length as usize];
        let mut covered = 0u64;
        for (o, d) in self.read(0, offset, length) {
            let at = (o - offset) as usize;
            out[at..at + d.len()].copy_from_slice(&d);
            covered += d.len() as u64;
        }
        assert_eq!(covered, length as u64, "READ did not cover the range");
        out
    }
}

/// The connection is still in sync: a small read answers correctly.
fn still_in_sync(r: &mut Raw, dev: &Recording) {
    assert_eq!(r.read_all(4096, 512), dev.bytes(4096, 512));
}

// ---- several exports -----------------------------------------------------

#[test]
fn two_exports_are_listed_and_each_name_serves_its_own_device() {
    let dir = tempfile::tempdir().unwrap();
    let a_bytes = pattern(MIB as usize, 11);
    // One export in memory, the other a raw file with data amid holes.
    let raw = dir.path().join("beta.raw");
    let b_bytes = sparse_raw(&raw, 3 * MIB, MIB, 512 * 1024 + 4096);
    let (a, p) = (data_dev(a_bytes.clone()), raw.clone());
    let a2 = Arc::clone(&a);
    let mut s = serve(move || async move {
        ServerConfig::new(vec![
            export("alpha", a2, false, true),
            image_export(&p, "beta", true).await,
        ])
    });
    let (ua, ub) = (s.uri("alpha"), s.uri("beta"));

    let list = tool_ok(30, "nbdinfo", &["--list", &ua]);
    assert!(list.contains("export=\"alpha\""), "{list}");
    assert!(list.contains("export=\"beta\""), "{list}");
    assert_eq!(list.matches("export=\"").count(), 2, "{list}");
    assert!(list.contains("description: export alpha"), "{list}");
    assert!(list.contains("description: test image"), "{list}");

    assert_eq!(tool_ok(30, "nbdinfo", &["--size", &ua]).trim(), "1048576");
    assert_eq!(tool_ok(30, "nbdinfo", &["--size", &ub]).trim(), "3145728");
    // Unknown names are refused, the empty (default) name too.
    assert!(
        !tool(30, "nbdinfo", &["--size", &s.uri("gamma")])
            .status
            .success()
    );
    assert!(
        !tool(30, "nbdinfo", &["--size", &s.uri("")])
            .status
            .success()
    );

    // Whole contents through nbdcopy, per export.
    for (uri, want, file) in [(&ua, &a_bytes, "a.out"), (&ub, &b_bytes, "b.out")] {
        let out = dir.path().join(file);
        tool_ok(60, "nbdcopy", &[uri, out.to_str().unwrap()]);
        assert!(std::fs::read(&out).unwrap() == *want, "{uri}: wrong bytes");
    }
    // qemu-io per export: the exact byte at a spot, and different pattern.
    let probe = |uri: &str, off: usize, v: u8| {
        tool_ok(
            30,
            "qemu-io",
            &[
                "-r",
                "-f",
                "raw",
                "-c",
                &format!("read -P {v} {off} 1"),
                uri,
            ],
        );
    };
    // At `k` alpha has a non-zero byte and beta a hole: the wrong device
    // would fail one of the two probes.
    let k = (700..1024).find(|&i| a_bytes[i] != 0).unwrap();
    assert_eq!(b_bytes[k], 0);
    probe(&ua, k, a_bytes[k]);
    probe(&ub, k, 0);
    probe(&ub, MIB as usize + 5, b_bytes[MIB as usize + 5]);

    // Writing through one name changes that device only.
    tool_ok(
        30,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 65536",
            "-c",
            "flush",
            &ua,
        ],
    );
    assert!(a.data.lock().unwrap()[..65536].iter().all(|&b| b == 0x5a));
    let out = dir.path().join("b2.out");
    tool_ok(60, "nbdcopy", &[&ub, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == b_bytes, "beta changed");
    // And beta is read-only while alpha is not.
    assert!(
        tool(30, "nbdinfo", &["--is", "read-only", &ub])
            .status
            .success()
    );
    assert_eq!(
        tool(30, "nbdinfo", &["--is", "read-only", &ua])
            .status
            .code(),
        Some(2)
    );
    s.stop().unwrap();
}

#[test]
fn multi_conn_is_advertised_only_when_the_export_allows_it() {
    let mk = |seed| data_dev(pattern(MIB as usize, seed)) as Arc<dyn BlockDevice>;
    let (d1, d2, d3, d4) = (mk(1), mk(2), mk(3), mk(4));
    let mut s = serve(move || async move {
        ServerConfig::new(vec![
            export("rw-on", d1, false, true),
            export("rw-off", d2, false, false),
            // Read-only: safe for multi-conn, but offered only when the
            // server takes several connections (the export says so).
            export("ro-off", d3, true, false),
            export("ro-on", d4, true, true),
        ])
    });
    for (name, want) in [
        ("rw-on", true),
        ("rw-off", false),
        ("ro-off", false),
        ("ro-on", true),
    ] {
        let o = tool(30, "nbdinfo", &["--can", "multi-conn", &s.uri(name)]);
        // nbdinfo --can: 0 = yes, 2 = no, anything else is a failure.
        assert_eq!(
            o.status.code(),
            Some(if want { 0 } else { 2 }),
            "{name}: {o:?}"
        );
        let r = go(&s, name);
        assert_eq!(
            r.flags & TFLAG_CAN_MULTI_CONN != 0,
            want,
            "{name}: flags {:#x}",
            r.flags
        );
        // The setting touches nothing else: a writable export still
        // advertises writes, flush and fast zero.
        if name.starts_with("rw") {
            let w = TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
            assert_eq!(r.flags & w, w, "{name}: flags {:#x}", r.flags);
            assert_eq!(r.flags & TFLAG_READ_ONLY, 0);
        } else {
            assert_ne!(r.flags & TFLAG_READ_ONLY, 0);
        }
    }
    s.stop().unwrap();
}

// ---- raw commands --------------------------------------------------------

const SIZE: u64 = 4 * MIB;

fn recording_server(read_only: bool) -> (Served, Arc<Recording>) {
    let dev = Arc::new(Recording::new(pattern(SIZE as usize, 5)));
    let d = Arc::clone(&dev);
    let s = serve(move || async move {
        ServerConfig::new(vec![export(
            "x",
            d as Arc<dyn BlockDevice>,
            read_only,
            true,
        )])
    });
    (s, dev)
}

#[test]
fn cache_succeeds_in_range_and_is_einval_out_of_range() {
    for read_only in [false, true] {
        let (mut s, dev) = recording_server(read_only);
        let before = dev.bytes(0, SIZE as usize);
        let mut r = go(&s, "x");
        assert_eq!(r.size, SIZE);
        assert_ne!(r.flags & TFLAG_SEND_CACHE, 0, "flags {:#x}", r.flags);

        dev.reads.lock().unwrap().clear();
        let a = r.call(Command::Cache, 0, MIB, 65536);
        assert_eq!(a.error, 0, "{a:?}");
        // No data comes back for a CACHE, only a completion.
        assert!(
            a.chunks.iter().all(|(_, c)| matches!(c, Chunk::None)),
            "{a:?}"
        );
        // The prefetch reached the device (that is how an overlay pulls it in).
        assert!(
            dev.reads
                .lock()
                .unwrap()
                .iter()
                .any(|&(o, l)| o <= MIB && o + l as u64 >= MIB + 65536),
            "CACHE did not read the range: {:?}",
            dev.reads.lock().unwrap()
        );
        // Up to the very end, and zero length at the end, are fine.
        assert_eq!(r.call(Command::Cache, 0, SIZE - 4096, 4096).error, 0);
        assert_eq!(r.call(Command::Cache, 0, SIZE, 0).error, 0);

        // Out of range: EINVAL (not ENOSPC: CACHE writes nothing).
        for (off, len) in [
            (SIZE - 100, 200u32),
            (SIZE, 1),
            (SIZE + 4096, 0),
            (u64::MAX - 10, 100),
        ] {
            let a = r.call(Command::Cache, 0, off, len);
            assert_eq!(a.error, EINVAL, "CACHE {off}+{len}: {a:?}");
            assert!(!a.simple, "error as a simple reply after structured: {a:?}");
        }
        // Longer than the largest payload.
        let a = r.call(Command::Cache, 0, 0, MAX_PAYLOAD + 1);
        assert_eq!(a.error, EINVAL, "{a:?}");

        still_in_sync(&mut r, &dev);
        assert!(dev.bytes(0, SIZE as usize) == before, "CACHE changed data");
        drop(r);
        s.stop().unwrap();
    }
}

#[test]
fn write_zeroes_fast_zero_succeeds_when_unmapping_and_is_enotsup_with_no_hole() {
    let (mut s, dev) = recording_server(false);
    let mut r = go(&s, "x");
    assert_ne!(r.flags & TFLAG_SEND_FAST_ZERO, 0, "flags {:#x}", r.flags);

    // FAST_ZERO alone: the server may unmap, and it answers at once.
    let t = Instant::now();
    let a = r.call(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, MIB, 65536);
    assert_eq!(a.error, 0, "{a:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "fast zero was slow");
    assert_eq!(r.read_all(MIB, 65536), vec![0u8; 65536]);
    assert_eq!(
        dev.zeroes.lock().unwrap().as_slice(),
        &[(MIB, 65536, true)],
        "FAST_ZERO without NO_HOLE should zero with unmapping allowed"
    );

    // FAST_ZERO with NO_HOLE cannot be fast: ENOTSUP, nothing touched.
    let before = dev.bytes(2 * MIB, 65536);
    assert!(before.iter().any(|&b| b != 0));
    let a = r.call(
        Command::WriteZeroes,
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        2 * MIB,
        65536,
    );
    assert_eq!(a.error, ENOTSUP, "{a:?}");
    assert!(!a.simple, "{a:?}");
    assert_eq!(
        dev.bytes(2 * MIB, 65536),
        before,
        "a failed fast zero wrote"
    );
    assert_eq!(dev.zeroes.lock().unwrap().len(), 1, "device was called");

    // With FUA too, still the same answer.
    let a = r.call(
        Command::WriteZeroes,
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        2 * MIB,
        512,
    );
    assert_eq!(a.error, ENOTSUP, "{a:?}");

    // Out of range wins over the fast-zero check's outcome: ENOSPC.
    let a = r.call(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, SIZE - 512, 1024);
    assert_eq!(a.error, ENOSPC, "{a:?}");

    still_in_sync(&mut r, &dev);
    drop(r);
    s.stop().unwrap();
}

#[test]
fn write_zeroes_no_hole_writes_zeros_without_unmapping() {
    let (mut s, dev) = recording_server(false);
    let mut r = go(&s, "x");
    let (off, len) = (3 * MIB + 512, 3 * 4096 + 512);
    let around = (dev.bytes(off - 512, 512), dev.bytes(off + len as u64, 512));
    assert!(dev.bytes(off, len as usize).iter().any(|&b| b != 0));

    let a = r.call(Command::WriteZeroes, CMD_FLAG_NO_HOLE, off, len);
    assert_eq!(a.error, 0, "{a:?}");
    assert_eq!(r.read_all(off, len), vec![0u8; len as usize]);
    // Exactly the range, neighbours untouched.
    assert_eq!(dev.bytes(off - 512, 512), around.0);
    assert_eq!(dev.bytes(off + len as u64, 512), around.1);
    assert_eq!(
        dev.zeroes.lock().unwrap().as_slice(),
        &[(off, len as u64, false)],
        "NO_HOLE must not allow unmapping"
    );

    // Without NO_HOLE the device may unmap.
    dev.zeroes.lock().unwrap().clear();
    let a = r.call(Command::WriteZeroes, 0, 0, 4096);
    assert_eq!(a.error, 0, "{a:?}");
    assert_eq!(dev.zeroes.lock().unwrap().as_slice(), &[(0, 4096, true)]);

    // Rewrite data, zero again with NO_HOLE|FUA: flushed, zero.
    r.write(off, &vec![0x77; 4096]);
    let flushes = dev.mem.flushes.load(std::sync::atomic::Ordering::SeqCst);
    let a = r.call(
        Command::WriteZeroes,
        CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
        off,
        4096,
    );
    assert_eq!(a.error, 0, "{a:?}");
    assert!(dev.mem.flushes.load(std::sync::atomic::Ordering::SeqCst) > flushes);
    assert_eq!(r.read_all(off, 4096), vec![0u8; 4096]);
    still_in_sync(&mut r, &dev);
    drop(r);
    s.stop().unwrap();
}

#[test]
fn df_read_comes_back_in_one_data_chunk() {
    let (mut s, dev) = recording_server(false);
    let mut r = go(&s, "x");
    assert_ne!(r.flags & TFLAG_SEND_DF, 0, "flags {:#x}", r.flags);
    // A zeroed stretch inside the read: with DF it must still be one
    // OFFSET_DATA chunk with the zeroes present, never a hole chunk.
    let a = r.call(Command::WriteZeroes, 0, MIB + 8192, 65536);
    assert_eq!(a.error, 0);

    for (off, len) in [
        (0u64, 512u32),
        (MIB, 65536),
        (MIB + 4096, 1 << 20),
        (SIZE - 3 * MIB, 3 * MIB as u32),
        (123, 4567),
    ] {
        let a = r.call(Command::Read, CMD_FLAG_DF, off, len);
        assert!(!a.simple, "{a:?}");
        assert_eq!(a.error, 0, "READ DF {off}+{len}");
        let content: Vec<_> = a
            .chunks
            .iter()
            .filter(|(_, c)| !matches!(c, Chunk::None))
            .collect();
        assert_eq!(
            content.len(),
            1,
            "READ DF {off}+{len}: {} content chunks",
            content.len()
        );
        match &content[0].1 {
            Chunk::OffsetData { offset, data } => {
                assert_eq!(*offset, off);
                assert_eq!(data.len(), len as usize);
                assert!(
                    *data == dev.bytes(off, len as usize),
                    "READ DF {off}+{len}: bytes"
                );
            }
            other => panic!("READ DF {off}+{len}: {other:?}"),
        }
        assert!(a.chunks.last().unwrap().0, "last chunk without DONE");
    }
    // DF out of range: an error, no content chunk.
    let a = r.call(Command::Read, CMD_FLAG_DF, SIZE - 512, 1024);
    assert_eq!(a.error, EINVAL, "{a:?}");
    assert!(
        !a.chunks
            .iter()
            .any(|(_, c)| matches!(c, Chunk::OffsetData { .. } | Chunk::OffsetHole { .. })),
        "{a:?}"
    );
    still_in_sync(&mut r, &dev);
    drop(r);
    s.stop().unwrap();
}

/// The spec: the server SHOULD return EINVAL for a flag not documented as
/// applicable to the request (qemu-nbd does). FUA applies to every command.
/// (The server accepted them all, checking only for unknown bits.)
#[test]
fn flags_on_the_wrong_command_get_einval() {
    let (mut s, dev) = recording_server(false);
    let mut r = go(&s, "x");
    for (cmd, f) in [
        (Command::Read, CMD_FLAG_FAST_ZERO),
        (Command::Read, CMD_FLAG_NO_HOLE),
        (Command::Read, CMD_FLAG_REQ_ONE),
        (Command::Write, CMD_FLAG_DF),
        (Command::Cache, CMD_FLAG_DF),
        (Command::WriteZeroes, CMD_FLAG_DF),
        (Command::Trim, CMD_FLAG_FAST_ZERO),
        (Command::Flush, CMD_FLAG_NO_HOLE),
    ] {
        let len = match cmd {
            Command::Flush => 0,
            _ => 512,
        };
        let cookie = if cmd == Command::Write {
            r.send(cmd, f, 0, len, &[0u8; 512])
        } else {
            r.send(cmd, f, 0, len, &[])
        };
        let a = r.answer(cookie);
        assert_eq!(
            a.error,
            EINVAL,
            "{cmd} with flags {f:#x}: error {}, {} chunk(s)",
            a.error,
            a.chunks.len()
        );
    }
    // FUA is valid on every command (meaningless on a read or a flush).
    for cmd in [Command::Read, Command::Flush, Command::Cache] {
        let len = if cmd == Command::Flush { 0 } else { 512 };
        let cookie = r.send(cmd, CMD_FLAG_FUA, 0, len, &[]);
        let a = r.answer(cookie);
        assert_eq!(a.error, 0, "{cmd} with FUA: error {}", a.error);
    }
    still_in_sync(&mut r, &dev);
    drop(r);
    s.stop().unwrap();
}
