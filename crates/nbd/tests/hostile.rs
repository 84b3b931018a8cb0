//! Hostile and broken clients speaking raw bytes to our server: each gets
//! the spec's error or a closed connection, and the server keeps serving
//! a well-behaved client afterwards.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use nbd::codec::*;
use nbd::server::{MAX_PAYLOAD, ServerConfig};

const SIZE: u64 = 1 << 20;

fn mem_server(
    read_only: bool,
    tweak: impl FnOnce(&mut ServerConfig) + Send + 'static,
) -> (Served, Arc<MemDevice>) {
    let dev = Arc::new(MemDevice::new(pattern(SIZE as usize, 7), vec![]));
    let d = Arc::clone(&dev);
    let s = serve(move || async move {
        let mut c = ServerConfig::new(vec![mem_export("x", d, read_only)]);
        tweak(&mut c);
        c
    });
    (s, dev)
}

fn connect(s: &Served) -> UnixStream {
    let c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0; n];
    c.read_exact(&mut b).unwrap();
    b
}

/// Reads until EOF (bounded by the read timeout); true when the peer closed.
fn closed(c: &mut UnixStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Greeting + client flags; returns the stream ready for options.
fn hello(s: &Served) -> UnixStream {
    let mut c = connect(s);
    let g = read_n(&mut c, 18);
    assert_eq!(
        decode_greeting(&g).unwrap().0,
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    let mut b = Vec::new();
    encode_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, &mut b);
    c.write_all(&b).unwrap();
    c
}

/// Enters transmission with EXPORT_NAME (simple replies only).
fn transmission(s: &Served) -> UnixStream {
    let mut c = hello(s);
    let mut b = Vec::new();
    encode_opt(&Opt::ExportName("x".into()), &mut b);
    c.write_all(&b).unwrap();
    let r = read_n(&mut c, 10);
    assert_eq!(decode_export_name_reply(&r, true).unwrap().0.0, SIZE);
    c
}

fn request(
    c: &mut UnixStream,
    command: Command,
    flags: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
) {
    let mut b = Vec::new();
    encode_request(
        &Request {
            flags,
            command,
            cookie: 0xc0ffee,
            offset,
            length,
        },
        &mut b,
    );
    b.extend_from_slice(payload);
    c.write_all(&b).unwrap();
}

/// Reads one simple reply, returning its error (and `n` data bytes on success).
fn simple_reply(c: &mut UnixStream, data_len: usize) -> (u32, Vec<u8>) {
    let h = read_n(c, SIMPLE_REPLY_LEN);
    match decode_reply(&h, 0, |_| Some(0)).unwrap().0 {
        Reply::Simple { cookie, error, .. } => {
            assert_eq!(cookie, 0xc0ffee);
            let data = if error == 0 {
                read_n(c, data_len)
            } else {
                vec![]
            };
            (error, data)
        }
        other => panic!("expected a simple reply, got {other:?}"),
    }
}

fn option_reply(c: &mut UnixStream) -> OptionReply {
    let h = read_n(c, 20);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut all = h;
    all.extend(read_n(c, len));
    decode_option_reply(&all).unwrap().0
}

/// A normal client still works: reads the first KiB and checks it.
fn still_serves(s: &Served, dev: &MemDevice) {
    let mut c = transmission(s);
    request(&mut c, Command::Read, 0, 0, 1024, &[]);
    let (e, d) = simple_reply(&mut c, 1024);
    assert_eq!(e, 0);
    assert_eq!(d, dev.data.lock().unwrap()[..1024]);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = hello(&s);
    c.write_all(&[0x55; 16]).unwrap();
    assert!(closed(&mut c));
    still_serves(&s, &dev);
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_goes_on() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = hello(&s);
    let mut b = Vec::new();
    encode_option(4242, b"junk", &mut b);
    c.write_all(&b).unwrap();
    let r = option_reply(&mut c);
    assert_eq!(r.option, 4242);
    assert!(
        matches!(
            r.reply,
            OptReply::Error {
                code: REP_ERR_UNSUP,
                ..
            }
        ),
        "{r:?}"
    );
    // STARTTLS without TLS configured is refused the same way.
    let mut b = Vec::new();
    encode_opt(&Opt::StartTls, &mut b);
    c.write_all(&b).unwrap();
    assert!(matches!(
        option_reply(&mut c).reply,
        OptReply::Error {
            code: REP_ERR_UNSUP,
            ..
        }
    ));
    // A malformed GO is ERR_INVALID, an unknown export ERR_UNKNOWN.
    let mut b = Vec::new();
    encode_option(OPT_GO, &[0, 0, 0, 50, b'x'], &mut b);
    c.write_all(&b).unwrap();
    assert!(matches!(
        option_reply(&mut c).reply,
        OptReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    let mut b = Vec::new();
    encode_opt(
        &Opt::Go {
            name: "nope".into(),
            requests: vec![],
        },
        &mut b,
    );
    c.write_all(&b).unwrap();
    assert!(matches!(
        option_reply(&mut c).reply,
        OptReply::Error {
            code: REP_ERR_UNKNOWN,
            ..
        }
    ));
    // Meta contexts before structured replies are invalid.
    let mut b = Vec::new();
    encode_opt(
        &Opt::SetMetaContext {
            export: "x".into(),
            queries: vec![CONTEXT_BASE_ALLOCATION.into()],
        },
        &mut b,
    );
    c.write_all(&b).unwrap();
    assert!(matches!(
        option_reply(&mut c).reply,
        OptReply::Error {
            code: REP_ERR_INVALID,
            ..
        }
    ));
    // ABORT is acknowledged and the server closes.
    let mut b = Vec::new();
    encode_opt(&Opt::Abort, &mut b);
    c.write_all(&b).unwrap();
    assert_eq!(option_reply(&mut c).reply, OptReply::Ack);
    assert!(closed(&mut c));
    still_serves(&s, &dev);
}

#[test]
fn oversized_option_closes_the_connection() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = hello(&s);
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.write_all(&b).unwrap();
    assert!(closed(&mut c));
    still_serves(&s, &dev);
}

#[test]
fn bad_request_magic_closes_the_connection() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = transmission(&s);
    c.write_all(&[0xab; REQUEST_HEADER_LEN]).unwrap();
    assert!(closed(&mut c));
    still_serves(&s, &dev);
}

#[test]
fn unknown_command_and_flags_get_einval() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = transmission(&s);
    request(&mut c, Command::Unknown(77), 0, 0, 0, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    request(&mut c, Command::Read, 1 << 12, 0, 512, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    // Block status without a negotiated context.
    request(&mut c, Command::BlockStatus, 0, 0, 512, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    // The connection is still usable.
    request(&mut c, Command::Read, 0, 512, 512, &[]);
    let (e, d) = simple_reply(&mut c, 512);
    assert_eq!(e, 0);
    assert_eq!(d, dev.data.lock().unwrap()[512..1024]);
}

#[test]
fn out_of_range_requests_get_einval_or_enospc() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = transmission(&s);
    request(&mut c, Command::Read, 0, SIZE - 100, 200, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    request(&mut c, Command::Read, 0, u64::MAX - 10, 100, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    request(&mut c, Command::Write, 0, SIZE, 4, b"abcd");
    assert_eq!(simple_reply(&mut c, 0).0, ENOSPC);
    request(&mut c, Command::WriteZeroes, 0, SIZE - 1, 2, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, ENOSPC);
    request(&mut c, Command::Trim, 0, SIZE + 1, 0, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    request(&mut c, Command::Read, 0, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    drop(c);
    still_serves(&s, &dev);
}

#[test]
fn write_longer_than_the_maximum_is_refused_then_closed() {
    let (s, dev) = mem_server(false, |_| {});
    let mut c = transmission(&s);
    request(&mut c, Command::Write, 0, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EINVAL);
    assert!(closed(&mut c));
    still_serves(&s, &dev);
}

#[test]
fn writes_to_a_read_only_export_get_eperm() {
    let (s, dev) = mem_server(true, |_| {});
    let before = dev.data.lock().unwrap().clone();
    let mut c = transmission(&s);
    request(&mut c, Command::Write, 0, 0, 4, b"evil");
    assert_eq!(simple_reply(&mut c, 0).0, EPERM);
    request(&mut c, Command::WriteZeroes, 0, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EPERM);
    request(&mut c, Command::Trim, 0, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, EPERM);
    request(&mut c, Command::Flush, 0, 0, 0, &[]);
    assert_eq!(simple_reply(&mut c, 0).0, 0);
    assert!(*dev.data.lock().unwrap() == before);
}

#[test]
fn client_stalling_in_the_handshake_is_dropped_and_others_are_served() {
    let (s, dev) = mem_server(false, |c| c.handshake_timeout = Duration::from_millis(500));
    let mut staller = connect(&s);
    let _ = read_n(&mut staller, 18); // greeting, then silence
    still_serves(&s, &dev);
    let t = Instant::now();
    assert!(closed(&mut staller));
    assert!(t.elapsed() < Duration::from_secs(5));
    // A client that sends half an option is dropped the same way.
    let mut half = hello(&s);
    half.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    assert!(closed(&mut half));
    still_serves(&s, &dev);
}

#[test]
fn connection_limit_holds_later_clients_until_a_slot_frees() {
    let (s, dev) = mem_server(false, |c| c.max_connections = 1);
    let first = transmission(&s);
    // The second connects (backlog) but gets no greeting while the first lives.
    let mut second = connect(&s);
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 18];
    assert!(second.read_exact(&mut b).is_err(), "greeted past the limit");
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    second.read_exact(&mut b).unwrap();
    assert!(decode_greeting(&b).is_ok());
    drop(second);
    still_serves(&s, &dev);
}

#[test]
fn disconnect_and_shutdown_finish_in_flight_requests_and_flush() {
    let dev = Arc::new({
        let mut d = MemDevice::new(vec![0; SIZE as usize], vec![]);
        d.delay = Duration::from_millis(300);
        d
    });
    let d = Arc::clone(&dev);
    let mut s = serve(move || async move { ServerConfig::new(vec![mem_export("x", d, false)]) });
    let mut c = transmission(&s);
    // Several pipelined writes, then DISC at once: all must land and be flushed.
    let mut b = Vec::new();
    for i in 0..8u64 {
        encode_request(
            &Request {
                flags: 0,
                command: Command::Write,
                cookie: i,
                offset: i * 4096,
                length: 4,
            },
            &mut b,
        );
        b.extend_from_slice(&[i as u8 + 1; 4]);
    }
    encode_request(
        &Request {
            flags: 0,
            command: Command::Disc,
            cookie: 99,
            offset: 0,
            length: 0,
        },
        &mut b,
    );
    c.write_all(&b).unwrap();
    // Eight replies, in any order, then close.
    let mut cookies = Vec::new();
    for _ in 0..8 {
        let h = read_n(&mut c, SIMPLE_REPLY_LEN);
        match decode_reply(&h, 0, |_| Some(0)).unwrap().0 {
            Reply::Simple {
                cookie, error: 0, ..
            } => cookies.push(cookie),
            other => panic!("{other:?}"),
        }
    }
    cookies.sort();
    assert_eq!(cookies, (0..8).collect::<Vec<_>>());
    assert!(closed(&mut c));
    for i in 0..8usize {
        assert_eq!(dev.data.lock().unwrap()[i * 4096], i as u8 + 1);
    }
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);

    // Server shutdown with a request in flight: it completes before the close.
    let mut c = transmission(&s);
    request(&mut c, Command::Write, 0, 8192 * 4, 4, b"last");
    std::thread::sleep(Duration::from_millis(50));
    let flushes = dev.flushes.load(Ordering::SeqCst);
    s.stop().unwrap();
    assert_eq!(simple_reply(&mut c, 0).0, 0);
    assert_eq!(&dev.data.lock().unwrap()[32768..32772], b"last");
    assert!(dev.flushes.load(Ordering::SeqCst) > flushes);
}
