//! A tiny progress display in qemu-img's style (`    (42.17/100%)`),
//! redrawn in place on standard error only when it is a terminal, and only
//! when the shown value changes, so it costs nothing in a pipeline.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// Progress over a known total of bytes.
#[derive(Debug)]
pub struct Progress {
    total: u64,
    state: Mutex<State>,
    enabled: bool,
}

#[derive(Debug)]
struct State {
    done: u64,
    shown: Option<u64>,
}

impl Progress {
    /// A display for `total` bytes, drawn when `wanted` and stderr is a terminal.
    pub fn new(total: u64, wanted: bool) -> Self {
        let p = Progress {
            total,
            state: Mutex::new(State {
                done: 0,
                shown: None,
            }),
            enabled: wanted && std::io::stderr().is_terminal(),
        };
        p.draw(0);
        p
    }

    /// Counts `n` more bytes done.
    pub fn add(&self, n: u64) {
        let done = {
            let mut s = self.state.lock().expect("progress lock");
            s.done += n;
            s.done
        };
        self.draw(done);
    }

    /// Percent in hundredths, 0..=10000.
    fn hundredths(&self, done: u64) -> u64 {
        if self.total == 0 {
            10000
        } else {
            (done.min(self.total) as u128 * 10000 / self.total as u128) as u64
        }
    }

    fn draw(&self, done: u64) {
        if !self.enabled {
            return;
        }
        let h = self.hundredths(done);
        let mut s = self.state.lock().expect("progress lock");
        if s.shown == Some(h) {
            return;
        }
        s.shown = Some(h);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "    ({}.{:02}/100%)\r", h / 100, h % 100);
        let _ = err.flush();
    }

    /// Draws 100% and ends the line.
    pub fn finish(&self) {
        if self.enabled {
            self.draw(self.total);
            eprintln!();
        }
    }
}
