//! This process's terminal: lines on stdout, and transfer progress as an indicatif bar on a
//! terminal, plain periodic lines otherwise, nothing with `--quiet`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::render::Sink;

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

/// One transfer's progress on screen.
struct Shown {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Instant,
}

/// Stdout with the progress of the transfers in flight, by label.
pub struct Terminal {
    mode: ProgressMode,
    shown: HashMap<String, Shown>,
}

impl Terminal {
    pub fn new(mode: ProgressMode) -> Self {
        Self { mode, shown: HashMap::new() }
    }

    fn new_bar(&self, label: &str, total: u64) -> Option<indicatif::ProgressBar> {
        (self.mode == ProgressMode::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        })
    }
}

impl Sink for Terminal {
    /// Above the bar while one is drawn (a hidden bar would swallow the line), else stdout.
    fn line(&mut self, text: &str) {
        match self.shown.values().find_map(|s| s.bar.as_ref().filter(|bar| !bar.is_hidden())) {
            Some(bar) => bar.println(text),
            None => out_line(text),
        }
    }

    fn progress(&mut self, label: &str, done: u64, total: u64) {
        if self.mode == ProgressMode::Quiet {
            return;
        }
        if !self.shown.contains_key(label) {
            let now = Instant::now();
            let shown = Shown { bar: self.new_bar(label, total), started: now, last_line: now };
            self.shown.insert(label.to_string(), shown);
        }
        let Some(shown) = self.shown.get_mut(label) else { return };
        match &shown.bar {
            Some(bar) => bar.set_position(done),
            None if shown.last_line.elapsed() >= LINE_INTERVAL => {
                shown.last_line = Instant::now();
                let percent = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
                let rate = mib(done) / shown.started.elapsed().as_secs_f64().max(1e-9);
                out_line(&format!(
                    "[PROGRESS] {label} {:.1}/{:.1} MiB ({percent:.0}%) {rate:.1} MiB/s",
                    mib(done),
                    mib(total)
                ));
            }
            None => {}
        }
    }

    fn finish(&mut self, label: &str) {
        if let Some(Shown { bar: Some(bar), .. }) = self.shown.remove(label) {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Terminal {
    /// A bar left behind (a command that failed mid-transfer) must not stay on the screen.
    fn drop(&mut self) {
        for (_, shown) in self.shown.drain() {
            if let Some(bar) = shown.bar {
                bar.finish_and_clear();
            }
        }
    }
}
