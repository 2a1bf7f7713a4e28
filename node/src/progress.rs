//! Transfer progress: an indicatif bar on a terminal, plain periodic lines otherwise, nothing
//! with `--quiet`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live bar (bytes, rate, ETA).
    Bar,
    /// A `[PROGRESS]` line about once a second (logs, pipes).
    Lines,
    /// Nothing but the final result.
    Quiet,
}

impl ProgressMode {
    /// Bar on a terminal, lines otherwise; quiet when asked.
    pub fn detect(quiet: bool) -> Self {
        if quiet {
            Self::Quiet
        } else if std::io::stdout().is_terminal() {
            Self::Bar
        } else {
            Self::Lines
        }
    }
}

const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// Progress of one transfer (thread-safe).
pub struct Progress {
    mode: ProgressMode,
    label: String,
    total: u64,
    done: AtomicU64,
    bar: Option<indicatif::ProgressBar>,
    last_line: Mutex<Instant>,
    started: Instant,
    /// Told of progress about ten times a second (the control socket forwards it).
    observer: Option<Box<dyn Fn(u64, u64) + Send + Sync>>,
    last_observed: Mutex<Instant>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("label", &self.label).field("total", &self.total).finish()
    }
}

/// Prints a line on stdout. A closed stdout (a detached listener, a pipe whose reader went
/// away) loses the line instead of panicking like `println!` would.
pub fn out_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl Progress {
    pub fn new(mode: ProgressMode, label: impl Into<String>, total: u64) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let label = label.into();
        if let Some(bar) = &bar {
            bar.set_message(label.clone());
        }
        Self {
            mode,
            label,
            total,
            done: AtomicU64::new(0),
            bar,
            last_line: Mutex::new(Instant::now()),
            started: Instant::now(),
            observer: None,
            last_observed: Mutex::new(Instant::now()),
        }
    }

    /// Progress that prints nothing here and reports `(done, total)` to `observer` instead.
    pub fn observed(
        label: impl Into<String>,
        total: u64,
        observer: Box<dyn Fn(u64, u64) + Send + Sync>,
    ) -> Self {
        let mut progress = Self::new(ProgressMode::Quiet, label, total);
        progress.observer = Some(observer);
        progress
    }

    /// Moves to an absolute position (for progress reported from elsewhere).
    pub fn set_done(&self, done: u64) {
        let current = self.done();
        if done > current {
            self.add(done - current);
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(observer) = &self.observer {
            if let Ok(mut last) = self.last_observed.lock() {
                if last.elapsed() >= Duration::from_millis(100) || done == self.total {
                    *last = Instant::now();
                    drop(last);
                    observer(done, self.total);
                }
            }
        }
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done);
                }
            }
            ProgressMode::Lines => {
                let Ok(mut last) = self.last_line.lock() else { return };
                if last.elapsed() >= LINE_INTERVAL {
                    *last = Instant::now();
                    drop(last);
                    self.print_line(done);
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    fn print_line(&self, done: u64) {
        let percent = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
        let rate = mib(done) / self.started.elapsed().as_secs_f64().max(1e-9);
        out_line(&format!(
            "[PROGRESS] {} {:.1}/{:.1} MiB ({percent:.0}%) {rate:.1} MiB/s",
            self.label,
            mib(done),
            mib(self.total)
        ));
    }

    /// Prints a line without breaking the bar (skipped when quiet).
    pub fn say(&self, line: &str) {
        match (&self.bar, self.mode) {
            (_, ProgressMode::Quiet) => {}
            (Some(bar), _) => bar.println(line),
            (None, _) => out_line(line),
        }
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
