//! Host I/O pressure from Linux PSI: the `total` stall counter of
//! `/proc/pressure/io` or of the job's cgroup `io.pressure`.
//!
//! The controller uses deltas of `total` (µs stalled, exact) rather than
//! `avg10`, which the kernel updates every 2 s and smooths over 10 s — far
//! too slow to back off within a tick. The cgroup path comes from the
//! `0::` line of `/proc/self/cgroup`; on a cgroup-v1 hybrid host the v2
//! tree is mounted at `/sys/fs/cgroup/unified`, not `/sys/fs/cgroup`.

use std::path::{Path, PathBuf};

use crate::policy::PsiSample;

/// Parses a PSI file: the `total=` of its `some` line.
pub fn parse(text: &str) -> Option<PsiSample> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let total = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?;
    Some(PsiSample {
        some_total_us: total.parse().ok()?,
    })
}

/// The v2 cgroup path of a process from the text of `/proc/PID/cgroup`.
pub fn cgroup_v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// Where this process's I/O pressure can be read, best first: its own
/// cgroup's `io.pressure` (in the v2 tree at `/sys/fs/cgroup` or, on a
/// hybrid host, `/sys/fs/cgroup/unified`), else the system-wide file.
pub fn discover() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup")
        && let Some(rel) = cgroup_v2_path(&text)
    {
        let rel = rel.trim_start_matches('/');
        for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            candidates.push(Path::new(root).join(rel).join("io.pressure"));
        }
    }
    candidates.push(PathBuf::from("/proc/pressure/io"));
    candidates.into_iter().find(|p| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| parse(&t))
            .is_some()
    })
}

/// Reads one sample from `path`; `None` if it is gone or unreadable.
pub fn read(path: &Path) -> Option<PsiSample> {
    parse(&std::fs::read_to_string(path).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_some_total() {
        let t = "some avg10=31.19 avg60=14.50 avg300=6.22 total=330262347\n\
                 full avg10=27.77 avg60=12.63 avg300=4.99 total=174958938\n";
        assert_eq!(
            parse(t),
            Some(PsiSample {
                some_total_us: 330262347
            })
        );
        assert_eq!(parse("full avg10=0 total=5\n"), None);
        assert_eq!(parse("some avg10=0 total=x\n"), None);
    }

    #[test]
    fn finds_the_v2_line_among_v1_ones() {
        let t = "12:blkio:/user.slice\n1:name=systemd:/user.slice/x\n0::/user.slice/x.scope\n";
        assert_eq!(cgroup_v2_path(t), Some("/user.slice/x.scope"));
        assert_eq!(cgroup_v2_path("4:memory:/\n"), None);
    }

    #[test]
    fn discovers_a_readable_file_on_this_host() {
        // Every supported kernel here has PSI; if it is missing the
        // controller runs without pressure input, which `discover` reports.
        if let Some(p) = discover() {
            assert!(read(&p).is_some(), "{}", p.display());
        }
    }
}
