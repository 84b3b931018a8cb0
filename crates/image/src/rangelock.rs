//! Exclusive locks on byte ranges, held across `.await`.
//!
//! Every request that changes allocation (writes, write-zeroes, discard,
//! copy-on-read and stream copies) takes the unit-aligned range it touches.
//! Disjoint ranges proceed in parallel; overlapping ones run one at a time,
//! so a copy can re-check allocation after taking its range and never
//! overwrite what a guest wrote meanwhile.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct State {
    held: Vec<(u64, u64, u64)>,
    next_id: u64,
}

/// A set of exclusively held ranges.
#[derive(Debug, Default, Clone)]
pub struct RangeLocks {
    inner: Arc<(Mutex<State>, Notify)>,
}

/// Holds `[start, end)` until dropped.
#[derive(Debug)]
pub struct RangeGuard {
    locks: RangeLocks,
    id: u64,
}

impl RangeLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard {
        let (state, notify) = &*self.inner;
        loop {
            // Register interest before looking, so a release between the
            // look and the await still wakes us.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                if !st.held.iter().any(|&(s, e, _)| s < end && start < e) {
                    let id = st.next_id;
                    st.next_id += 1;
                    st.held.push((start, end, id));
                    return RangeGuard {
                        locks: self.clone(),
                        id,
                    };
                }
            }
            notified.await;
        }
    }

    /// Whether any held range overlaps `[start, end)` (for statistics and tests).
    pub fn is_locked(&self, start: u64, end: u64) -> bool {
        let st = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        st.held.iter().any(|&(s, e, _)| s < end && start < e)
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let (state, notify) = &*self.locks.inner;
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.held.retain(|&(_, _, id)| id != self.id);
        drop(st);
        notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ranges_do_not() {
        let locks = RangeLocks::new();
        let a = locks.lock(0, 100).await;
        let _b = tokio::time::timeout(Duration::from_secs(1), locks.lock(100, 200))
            .await
            .expect("disjoint range must not wait");
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move { l2.lock(50, 60).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "overlapping range must wait");
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("released range must wake the waiter")
            .unwrap();
    }
}
