//! Metadata lookup is separated from data I/O, so reads of allocated
//! clusters run in parallel: while the device takes its time over the data
//! read of one qcow2 or QED cluster (its mapping already looked up), a read
//! of another allocated cluster, and an in-place write of a third, finish
//! without waiting for it, and the held read still returns the right bytes.

use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{Engine, engine_with_data};
use image::format::{Format, Mapping};
use image::storage::{MemStorage, Storage};

mod common;

const CLUSTER: u64 = 64 * 1024;
/// Guest clusters in the image; every one of them is allocated.
const CLUSTERS: u64 = 16;
/// How long a read may sit in the gate before it goes on regardless, so no
/// mistake can hang the test.
const GATE_LIMIT: Duration = Duration::from_secs(20);
/// How long the other I/O may take while a read is held.
const PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct GateState {
    /// Host range `[start, end)` whose reads are held while `closed`.
    range: Option<(u64, u64)>,
    closed: bool,
    /// Reads waiting in the gate now.
    waiting: u32,
    /// Reads of the range that went through the gate.
    passed: u32,
}

/// Memory storage that, once armed, holds every read touching one host
/// range until the gate opens (or `GATE_LIMIT` passes); other reads and
/// all writes go straight through.
#[derive(Debug, Default)]
struct GatedReads {
    mem: MemStorage,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl GatedReads {
    fn close_on(&self, start: u64, len: u64) {
        let mut st = self.state.lock().unwrap();
        st.range = Some((start, start + len));
        st.closed = true;
    }

    fn open(&self) {
        self.state.lock().unwrap().closed = false;
        self.changed.notify_all();
    }

    /// Waits until a read is held in the gate.
    fn wait_for_held_read(&self) {
        let st = self.state.lock().unwrap();
        let (st, t) = self
            .changed
            .wait_timeout_while(st, PATIENCE, |s| s.waiting == 0)
            .unwrap();
        assert!(
            !t.timed_out() && st.waiting > 0,
            "no read reached the gated host range"
        );
    }

    fn waiting(&self) -> u32 {
        self.state.lock().unwrap().waiting
    }

    fn passed(&self) -> u32 {
        self.state.lock().unwrap().passed
    }
}

/// Opens the gate when dropped, so a failing assertion never leaves a
/// reader parked until `GATE_LIMIT`.
struct OpenOnDrop<'a>(&'a GatedReads);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

impl Storage for GatedReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut st = self.state.lock().unwrap();
        if let Some((lo, hi)) = st.range
            && offset < hi
            && lo < end
        {
            st.waiting += 1;
            self.changed.notify_all();
            let (mut st2, _) = self
                .changed
                .wait_timeout_while(st, GATE_LIMIT, |s| s.closed)
                .unwrap();
            st2.waiting -= 1;
            st2.passed += 1;
            st = st2;
        }
        drop(st);
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.mem.flush()
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
    fn path(&self) -> &Path {
        self.mem.path()
    }
}

/// The content written to guest cluster `c`: a pattern that differs from
/// cluster to cluster and from byte to byte within one.
fn pattern(c: u64, round: u8) -> Vec<u8> {
    (0..CLUSTER)
        .map(|i| (c as u8).wrapping_mul(31) ^ (i % 251) as u8 ^ round)
        .collect()
}

/// A new image of `kind` on gated storage with every cluster allocated and
/// holding `pattern(c, 0)`.
fn open_allocated(kind: Engine) -> (Arc<GatedReads>, Arc<dyn Format>) {
    let st = Arc::new(GatedReads {
        mem: MemStorage::new("gated-reads.img"),
        ..Default::default()
    });
    let all: Vec<u8> = (0..CLUSTERS).flat_map(|c| pattern(c, 0)).collect();
    let f = engine_with_data(kind, &st, CLUSTERS * CLUSTER, CLUSTER, &all);
    (st, f)
}

/// Where guest cluster `c` lives in the file.
fn host_of(f: &dyn Format, c: u64) -> u64 {
    let ranges = f.map(c * CLUSTER, CLUSTER).unwrap();
    match ranges.as_slice() {
        [r] if r.length == CLUSTER => match r.mapping {
            Mapping::Data { host_offset } => host_offset,
            other => panic!("guest cluster {c} is not plain data: {other:?}"),
        },
        other => panic!("guest cluster {c} maps in pieces: {other:?}"),
    }
}

/// Reads guest cluster `c` on a thread of its own; the result comes on the
/// channel.
fn read_on_thread(f: &Arc<dyn Format>, c: u64) -> mpsc::Receiver<image::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    let f = Arc::clone(f);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CLUSTER as usize];
        let r = f.read(c * CLUSTER, &mut buf).map(|holes| {
            assert!(
                holes.is_empty(),
                "holes in allocated cluster {c}: {holes:?}"
            );
            buf
        });
        let _ = tx.send(r);
    });
    rx
}

fn assert_cluster(what: &str, got: &[u8], c: u64, round: u8) {
    assert!(
        got == pattern(c, round).as_slice(),
        "{what}: guest cluster {c} does not hold round {round} of its pattern"
    );
}

/// One test per format for each scenario below.
macro_rules! per_format {
    ($($scenario:ident: $qcow2:ident, $qed:ident;)*) => {$(
        #[test]
        fn $qcow2() {
            $scenario(Engine::Qcow2);
        }
        #[test]
        fn $qed() {
            $scenario(Engine::Qed);
        }
    )*};
}

per_format! {
    other_io_goes_on_while_a_data_read_is_held:
        qcow2_reads_and_writes_of_allocated_clusters_go_on_while_a_data_read_is_held,
        qed_reads_and_writes_of_allocated_clusters_go_on_while_a_data_read_is_held;
}

fn other_io_goes_on_while_a_data_read_is_held(kind: Engine) {
    const A: u64 = 3;
    const B: u64 = 9;
    const C: u64 = 12;
    let (st, f) = open_allocated(kind);
    let (host_a, host_b, host_c) = (host_of(&*f, A), host_of(&*f, B), host_of(&*f, C));
    for (c, h) in [(B, host_b), (C, host_c)] {
        assert!(
            h.abs_diff(host_a) >= CLUSTER,
            "guest clusters {A} and {c} share a host cluster ({host_a:#x}, {h:#x})"
        );
    }

    // The read of A looks up its mapping, then its data read waits in the
    // device.
    st.close_on(host_a, CLUSTER);
    let _open = OpenOnDrop(&st);
    let read_a = read_on_thread(&f, A);
    st.wait_for_held_read();

    // A read of B and an in-place write of C finish meanwhile.
    let read_b = read_on_thread(&f, B);
    let got_b = read_b
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("the read of cluster {B} waited for the held read of {A}"))
        .unwrap();
    assert_cluster("read while A is held", &got_b, B, 0);

    let (tx, rx) = mpsc::channel();
    {
        let f = Arc::clone(&f);
        std::thread::spawn(move || {
            let _ = tx.send(f.write(C * CLUSTER, &pattern(C, 1), &[]));
        });
    }
    rx.recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("the write of cluster {C} waited for the held read of {A}"))
        .unwrap();

    // All that happened while A was still in the device.
    assert_eq!(st.waiting(), 1, "the read of cluster {A} is still held");
    assert_eq!(st.passed(), 0, "nothing went through the gate yet");
    assert!(
        matches!(read_a.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the read of cluster {A} finished before the gate opened"
    );

    // Released, A's read completes with its own data.
    st.open();
    let got_a = read_a
        .recv_timeout(PATIENCE)
        .expect("the read of cluster A finished once released")
        .unwrap();
    assert_cluster("held read", &got_a, A, 0);
    assert_eq!(st.passed(), 1);

    // The write landed in place: same host cluster, new content; the rest
    // is untouched.
    assert_eq!(
        host_of(&*f, C),
        host_c,
        "an in-place write moved cluster {C}"
    );
    let mut all = vec![0u8; (CLUSTERS * CLUSTER) as usize];
    assert!(f.read(0, &mut all).unwrap().is_empty());
    for (c, got) in (0..CLUSTERS).zip(all.chunks(CLUSTER as usize)) {
        assert_cluster("read back", got, c, if c == C { 1 } else { 0 });
    }
    f.close().unwrap();
}
