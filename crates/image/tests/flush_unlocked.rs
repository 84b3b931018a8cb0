//! A guest's flush must not stall the image: while the device takes its
//! time over the sync of a qcow2 or QED flush, reads and writes of
//! allocated clusters go on (the sync runs without the metadata lock), and
//! the flush still writes the tables before it returns.

use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{Engine, engine_with_data, open_engine};
use image::format::Format;
use image::storage::{MemStorage, Storage};

mod common;

/// Memory storage whose flush, once `hold` is set, waits until released,
/// and which counts the flushes that returned.
#[derive(Debug, Default)]
struct SlowSync {
    mem: MemStorage,
    /// (hold flushes, flushes waiting now)
    state: Mutex<(bool, u32)>,
    changed: Condvar,
    synced: Mutex<u32>,
}

impl SlowSync {
    fn hold(&self, on: bool) {
        self.state.lock().unwrap().0 = on;
        self.changed.notify_all();
    }

    /// Waits until a flush is held in the device.
    fn wait_for_held_flush(&self) {
        let st = self.state.lock().unwrap();
        let (st, t) = self
            .changed
            .wait_timeout_while(st, Duration::from_secs(10), |s| s.1 == 0)
            .unwrap();
        assert!(!t.timed_out() && st.1 > 0, "no flush reached the device");
    }
}

impl Storage for SlowSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.1 += 1;
        self.changed.notify_all();
        let (mut st, _) = self
            .changed
            .wait_timeout_while(st, Duration::from_secs(10), |s| s.0)
            .unwrap();
        st.1 -= 1;
        *self.synced.lock().unwrap() += 1;
        Ok(())
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

const CLUSTER: u64 = 64 * 1024;

/// A new image of `kind` on slow-sync storage, with clusters 0 and 1
/// allocated.
fn open_allocated(kind: Engine) -> (Arc<SlowSync>, Arc<dyn Format>) {
    let st = Arc::new(SlowSync {
        mem: MemStorage::new("slow-sync.img"),
        ..Default::default()
    });
    let data = vec![1u8; 2 * CLUSTER as usize];
    let f = engine_with_data(kind, &st, 16 * CLUSTER, CLUSTER, &data);
    (st, f)
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
    reads_and_writes_go_on_during_a_flush:
        qcow2_reads_and_writes_of_allocated_clusters_go_on_during_a_flush,
        qed_reads_and_writes_of_allocated_clusters_go_on_during_a_flush;
    a_flush_writes_the_tables:
        qcow2_a_flush_after_an_allocation_writes_the_tables_before_it_returns,
        qed_a_flush_after_an_allocation_writes_the_tables_before_it_returns;
}

fn reads_and_writes_go_on_during_a_flush(kind: Engine) {
    let (st, q) = open_allocated(kind);
    // Overwrite in place (no metadata changes), then flush: the device
    // holds the sync.
    q.write(0, &vec![2u8; CLUSTER as usize], &[]).unwrap();
    st.hold(true);
    let flusher = {
        let q = Arc::clone(&q);
        std::thread::spawn(move || q.flush())
    };
    st.wait_for_held_flush();

    let (tx, rx) = mpsc::channel();
    {
        let q = Arc::clone(&q);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CLUSTER as usize];
            let read = q.read(CLUSTER, &mut buf).map(|holes| (holes, buf[0]));
            let write = q.write(CLUSTER, &vec![3u8; CLUSTER as usize], &[]);
            let _ = tx.send((read, write));
        });
    }
    let outcome = rx.recv_timeout(Duration::from_secs(3));
    st.hold(false);
    let (read, write) = outcome.expect("a read and a write waited for the device's sync");
    let (holes, first) = read.unwrap();
    assert!(holes.is_empty() && first == 1, "{holes:?} {first}");
    write.unwrap();

    flusher.join().unwrap().unwrap();
    assert!(
        *st.synced.lock().unwrap() >= 2,
        "the flush reached the device"
    );
    let mut buf = vec![0u8; 2 * CLUSTER as usize];
    q.read(0, &mut buf).unwrap();
    assert!(buf[..CLUSTER as usize].iter().all(|&b| b == 2));
    assert!(buf[CLUSTER as usize..].iter().all(|&b| b == 3));
}

fn a_flush_writes_the_tables(kind: Engine) {
    let (st, q) = open_allocated(kind);
    q.write(3 * CLUSTER, &vec![7u8; 4096], &[]).unwrap();
    let before = *st.synced.lock().unwrap();
    q.flush().unwrap();
    let synced = *st.synced.lock().unwrap() - before;
    assert!(
        synced >= 2,
        "data, then the tables, then a sync: {synced} syncs"
    );
    // Tables are written back lazily: only the flush put the new entry in
    // the storage, so a fresh open of a copy of its bytes sees the write.
    let copy = Arc::new(MemStorage::new("copy.img"));
    let mut bytes = vec![0u8; st.mem.len().unwrap() as usize];
    st.mem.read_at(&mut bytes, 0).unwrap();
    copy.write_at(&bytes, 0).unwrap();
    let f = open_engine(kind, copy, false);
    let mut buf = vec![0u8; 4096];
    assert!(f.read(3 * CLUSTER, &mut buf).unwrap().is_empty());
    assert!(buf.iter().all(|&b| b == 7));
}
