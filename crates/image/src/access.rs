//! What the guest touched, for hot-data-first streaming: hints where a guest
//! read found data still remote (the stream continues right after it), and
//! an optional access profile, the order in which the guest first touched
//! each range, that a later stream of another overlay on the same base can
//! copy first.
//!
//! The one decision to know: a profile is a list of range offsets in first-
//! touch order at a fixed unit, in a small text file (`# diskstream access
//! profile v1 unit=N`, then one decimal offset a line), so it can be read,
//! diffed and edited by hand, and is independent of the overlay's format.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Hints kept at most; older ones are dropped (the stream reaches them in
/// its scan anyway).
const MAX_HINTS: usize = 64;

/// The text header of a profile file.
const PROFILE_MAGIC: &str = "# diskstream access profile v1";

/// Guest access tracking of one image. Cheap when nothing records: one
/// relaxed load per guest read, plus a lock only on remote reads.
#[derive(Debug, Default)]
pub struct Access {
    hints: Mutex<VecDeque<u64>>,
    recording: AtomicBool,
    profile: Mutex<Option<Recorder>>,
}

#[derive(Debug)]
struct Recorder {
    unit: u64,
    seen: HashSet<u64>,
    order: Vec<u64>,
}

impl Access {
    /// A guest read of `[offset, offset + len)`; `remote` when part of it
    /// still came from below.
    pub(crate) fn guest_read(&self, offset: u64, len: u64, remote: bool) {
        if remote {
            let mut h = self.hints.lock().unwrap_or_else(|e| e.into_inner());
            if h.len() == MAX_HINTS {
                h.pop_front();
            }
            h.push_back(offset + len);
        }
        if self.recording.load(Ordering::Relaxed) {
            let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = p.as_mut() {
                let end = offset + len.max(1);
                let mut u = offset - offset % r.unit;
                while u < end {
                    if r.seen.insert(u) {
                        r.order.push(u);
                    }
                    u += r.unit;
                }
            }
        }
    }

    /// The most recent place right after a guest read of remote data, if
    /// any is pending; each hint is returned once.
    pub fn take_hint(&self) -> Option<u64> {
        self.hints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_back()
    }

    /// Starts recording first touches at `unit` granularity.
    pub fn start_profile(&self, unit: u64) {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner()) = Some(Recorder {
            unit: unit.max(512),
            seen: HashSet::new(),
            order: Vec::new(),
        });
        self.recording.store(true, Ordering::Relaxed);
    }

    /// The profile recorded so far, if recording was started.
    pub fn profile(&self) -> Option<Profile> {
        let p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        p.as_ref().map(|r| Profile {
            unit: r.unit,
            offsets: r.order.clone(),
        })
    }
}

/// Ranges in the order the guest first touched them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    /// Bytes per range.
    pub unit: u64,
    /// Range starts, multiples of `unit`, in first-touch order.
    pub offsets: Vec<u64>,
}

impl Profile {
    pub fn to_text(&self) -> String {
        let mut s = format!("{PROFILE_MAGIC} unit={}\n", self.unit);
        for o in &self.offsets {
            s.push_str(&o.to_string());
            s.push('\n');
        }
        s
    }

    /// Parses a profile file; the error names the line.
    pub fn parse(text: &str) -> std::result::Result<Profile, String> {
        let mut lines = text.lines().enumerate();
        let (_, head) = lines.next().ok_or("empty profile")?;
        let unit = head
            .strip_prefix(PROFILE_MAGIC)
            .and_then(|r| r.trim().strip_prefix("unit="))
            .ok_or_else(|| format!("line 1: expected '{PROFILE_MAGIC} unit=N'"))?
            .parse::<u64>()
            .map_err(|e| format!("line 1: unit: {e}"))?;
        if unit == 0 || unit % 512 != 0 {
            return Err(format!(
                "line 1: unit {unit} is not a positive multiple of 512"
            ));
        }
        let mut offsets = Vec::new();
        for (i, l) in lines {
            let l = l.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let o: u64 = l.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
            if o % unit != 0 {
                return Err(format!(
                    "line {}: offset {o} is not a multiple of {unit}",
                    i + 1
                ));
            }
            offsets.push(o);
        }
        Ok(Profile { unit, offsets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_touch_order_once_per_unit() {
        let a = Access::default();
        a.guest_read(0, 512, false);
        a.start_profile(65536);
        a.guest_read(200_000, 4096, false);
        a.guest_read(0, 70_000, false);
        a.guest_read(196_608, 1, false);
        let p = a.profile().unwrap();
        assert_eq!(p.offsets, vec![196_608, 0, 65536]);
        assert_eq!(Profile::parse(&p.to_text()).unwrap(), p);
    }

    #[test]
    fn hints_follow_remote_reads_newest_first() {
        let a = Access::default();
        a.guest_read(0, 4096, false);
        assert_eq!(a.take_hint(), None);
        a.guest_read(8192, 4096, true);
        a.guest_read(1 << 20, 4096, true);
        assert_eq!(a.take_hint(), Some((1 << 20) + 4096));
        assert_eq!(a.take_hint(), Some(12288));
        assert_eq!(a.take_hint(), None);
    }

    #[test]
    fn parse_rejects_bad_files_by_line() {
        assert!(Profile::parse("").is_err());
        assert!(Profile::parse("hello\n").unwrap_err().contains("line 1"));
        let e = Profile::parse("# diskstream access profile v1 unit=4096\n0\n100\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e = Profile::parse("# diskstream access profile v1 unit=100\n").unwrap_err();
        assert!(e.contains("512"), "{e}");
    }
}
