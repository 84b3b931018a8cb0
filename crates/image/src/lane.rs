//! A write lane: a few blocking-pool threads that drain a queue of writes
//! to one image, instead of one pool thread per write.
//!
//! Writes through the page cache to one file serialise in the kernel on the
//! inode lock, so running 32 of them on 32 threads buys no parallelism: it
//! buys 32 threads spinning and sleeping on that lock, a wake-up per write
//! to hand it to a thread, and a thread per burst left idle afterwards. A
//! lane runs at most `width` drainers; a write queued while they run is
//! picked up by the next free one without any wake-up, so a burst of writes
//! costs one handoff, not one each. (4 KiB random writes at queue depth 32
//! over NBD, qcow2 and raw: 0.5-0.7 context switches per write instead of
//! 3, a third less CPU per write, 1.3x the writes per second.) Writes with
//! O_DIRECT do run in parallel in the device, and do not go through a lane;
//! nor do writes over [`MAX_WRITE`], whose handoff is small next to the
//! copy, and which a lane made slower (convert to qcow2 through the page
//! cache, 2 MiB writes, 8 in flight: 1.33 s with a lane, 1.14 s without,
//! medians of 6).
//!
//! The decision a reader must know: a job that is queued runs to the end
//! even if the caller stops waiting, exactly as a `spawn_blocking` task
//! does, and the lane survives a job that panics (its caller gets
//! [`Error::Internal`]).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Drainers per lane for page-cache writes. One is as fast (randwrite 4k
/// QD32: 1, 2 and 4 within noise of each other, 8 and the unbounded pool
/// clearly slower), but two keep writes moving while one of them waits
/// long: an fsync for a FUA write, a copy-on-write read of the backing,
/// the kernel throttling a writer of dirty pages.
pub const PAGE_CACHE_WIDTH: usize = 2;

/// The most bytes a call may touch (data and copy-on-write fills; the
/// range of a write-zeroes or discard) and still go through a lane: a long
/// call would hold one of its two threads.
pub const MAX_WRITE: usize = 64 * 1024;

type Job = Box<dyn FnOnce() + Send>;

struct State {
    jobs: VecDeque<Job>,
    /// Drainers running now (at most `width`).
    running: usize,
}

/// See the module documentation.
pub struct Lane {
    width: usize,
    state: Mutex<State>,
    /// Told whenever a drainer exits (the queue was empty).
    drained: tokio::sync::Notify,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").field("width", &self.width).finish()
    }
}

impl Lane {
    /// A lane of at most `width` (at least 1) drainers.
    pub fn new(width: usize) -> Arc<Self> {
        Arc::new(Lane {
            width: width.max(1),
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                running: 0,
            }),
            drained: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A job never runs under this lock, so poisoning cannot leave the
        // queue half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on one of the lane's drainers and returns its result.
    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let start_drainer = {
            let mut st = self.lock();
            st.jobs.push_back(job);
            if st.running < self.width {
                st.running += 1;
                true
            } else {
                false
            }
        };
        if start_drainer {
            let lane = Arc::clone(self);
            // Not awaited: the drainer reports through each job's channel.
            drop(tokio::task::spawn_blocking(move || lane.drain()));
        }
        rx.await
            .unwrap_or_else(|_| Err(Error::Internal("write task failed (panicked)".into())))
    }

    /// Waits until no job is queued or running: before the image closes,
    /// so a write whose caller stopped waiting does not land after it.
    pub async fn idle(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            // Registered before the check, so an exit in between is seen.
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.running == 0 && st.jobs.is_empty() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Runs queued jobs until the queue is empty.
    fn drain(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                match st.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        st.running -= 1;
                        drop(st);
                        self.drained.notify_waiters();
                        return;
                    }
                }
            };
            // A panicking job drops its sender: its caller sees the error,
            // and this drainer goes on with the queue.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_every_job_and_never_more_than_width_at_once() {
        let lane = Lane::new(2);
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40u64 {
            let (lane, now, peak) = (Arc::clone(&lane), Arc::clone(&now), Arc::clone(&peak));
            tasks.spawn(async move {
                lane.run(move || {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(i * 2)
                })
                .await
            });
        }
        let mut sum = 0;
        while let Some(r) = tasks.join_next().await {
            sum += r.unwrap().unwrap();
        }
        assert_eq!(sum, (0..40u64).map(|i| i * 2).sum::<u64>());
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&peak),
            "{peak} jobs ran at once in a lane of 2"
        );
        // A drainer exits just after its last job answers.
        tokio::time::timeout(Duration::from_secs(5), lane.idle())
            .await
            .expect("drainers exit when the queue is empty");
        assert_eq!(lane.lock().running, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_its_caller_and_the_lane_goes_on() {
        let lane = Lane::new(1);
        let r: Result<()> = lane.run(|| panic!("job panics")).await;
        assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
        assert_eq!(lane.run(|| Ok(7)).await.unwrap(), 7);
        tokio::time::timeout(Duration::from_secs(5), lane.idle())
            .await
            .expect("the drainer went on and exited");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_caller_gave_up_still_runs() {
        let lane = Lane::new(1);
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        let fut = lane.run(move || {
            std::thread::sleep(Duration::from_millis(20));
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        });
        // Poll once so the job is queued, then drop the caller.
        let _ = tokio::time::timeout(Duration::from_millis(1), fut).await;
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        lane.idle().await;
        assert_eq!(ran.load(Ordering::SeqCst), 1, "idle() waited for it");
    }
}
