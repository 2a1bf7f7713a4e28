//! This process's terminal: lines on stdout, and transfer progress as indicatif bars (on
//! stderr) when both stdout and stderr are terminals, plain periodic `[PROGRESS]` lines
//! otherwise (no ANSI), nothing with `--quiet`. Lines are printed with the bars suspended, so
//! a line is never glued to a bar.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use qpeer_node::transfer::TransferProgress;

use crate::render::Sink;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Live bars (bytes, rate, ETA, file being carried).
    Bar,
    /// A `[PROGRESS]` line about once a second (logs, pipes).
    Lines,
    /// Nothing but the final result.
    Quiet,
}

impl ProgressMode {
    /// Bars on a terminal, lines otherwise; quiet when asked.
    pub fn detect(quiet: bool) -> Self {
        if quiet {
            Self::Quiet
        } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
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

/// `bytes` for people: `512 B`, `3.4 KiB`, `60.0 MiB`, `1.2 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A rate in bytes per second for people: `14.2 MiB/s`.
pub fn human_rate(bytes_per_sec: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_sec.max(0.0) as u64))
}

/// A duration for people: `0.4 s`, `42 s`, `3 min 5 s`, `2 h 10 min`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.1} s")
    } else if secs < 60.0 {
        format!("{secs:.0} s")
    } else if secs < 3600.0 {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    } else {
        format!("{} h {} min", d.as_secs() / 3600, d.as_secs() % 3600 / 60)
    }
}

use qpeer_node::transfer::rate;

/// How far one transfer has come, as shown (what [`TransferProgress`] gives, or what the
/// control socket carried of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressView {
    /// Bytes the receiver holds (resumed ones included), at most `total`.
    pub done: u64,
    pub total: u64,
    /// Bytes carried in this transfer: the rate counts only these.
    pub sent_now: u64,
    pub elapsed: Duration,
    pub files_done: u32,
    pub files: u32,
    /// The file being carried now: path, bytes done, size.
    pub current: Option<(String, u64, u64)>,
}

impl ProgressView {
    pub fn of(progress: &TransferProgress) -> Self {
        Self {
            done: progress.done.min(progress.total),
            total: progress.total,
            sent_now: progress.sent_now,
            elapsed: progress.elapsed,
            files_done: progress.files_done,
            files: progress.files,
            current: progress.active.first().map(|f| (f.path.clone(), f.done, f.size)),
        }
    }

    /// Bytes per second carried now.
    pub fn rate(&self) -> f64 {
        rate(self.sent_now, self.elapsed)
    }

    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            (self.done as f64 * 100.0 / self.total as f64).min(100.0)
        }
    }

    /// Time left at the rate so far.
    pub fn eta(&self) -> Option<Duration> {
        let left = self.total.saturating_sub(self.done);
        if left == 0 {
            return Some(Duration::ZERO);
        }
        let rate = self.rate();
        (rate > 0.0).then(|| Duration::from_secs_f64((left as f64 / rate).min(1e7)))
    }

    /// `14.2 MiB/s, ETA 4 s, 3/10 files, now photos/a.jpg 1.2/5.0 MiB`.
    pub fn details(&self) -> String {
        let mut text = human_rate(self.rate());
        if let Some(eta) = self.eta().filter(|_| self.done < self.total) {
            text.push_str(&format!(", ETA {}", human_duration(eta)));
        }
        text.push_str(&format!(", {}/{} files", self.files_done, self.files));
        if let Some((path, done, size)) = &self.current {
            text.push_str(&format!(
                ", now {} {}/{}",
                qpeer_wire::printable(path, 80),
                human_bytes(*done),
                human_bytes(*size)
            ));
        }
        text
    }

    /// The plain line: `12.0 MiB/60.0 MiB (20%), 3/10 files, …`.
    pub fn line(&self) -> String {
        format!(
            "{}/{} ({:.0}%), {}",
            human_bytes(self.done),
            human_bytes(self.total),
            self.percent(),
            self.details()
        )
    }
}

/// One transfer's progress on screen.
struct Shown {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
}

/// Stdout with the progress of the transfers in flight, by label.
pub struct Terminal {
    mode: ProgressMode,
    bars: indicatif::MultiProgress,
    shown: HashMap<String, Shown>,
}

impl Terminal {
    pub fn new(mode: ProgressMode) -> Self {
        let bars = indicatif::MultiProgress::with_draw_target(if mode == ProgressMode::Bar {
            indicatif::ProgressDrawTarget::stderr()
        } else {
            indicatif::ProgressDrawTarget::hidden()
        });
        Self { mode, bars, shown: HashMap::new() }
    }

    fn new_bar(&self, label: &str, total: u64) -> Option<indicatif::ProgressBar> {
        (self.mode == ProgressMode::Bar).then(|| {
            let bar = self.bars.add(indicatif::ProgressBar::new(total));
            let style = indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:20}] {bytes}/{total_bytes} ({percent}%) {wide_msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        })
    }

    fn has_bars(&self) -> bool {
        self.shown.values().any(|s| s.bar.is_some())
    }
}

impl Sink for Terminal {
    /// Above the bars while any is drawn, else stdout.
    fn line(&mut self, text: &str) {
        if self.has_bars() {
            self.bars.suspend(|| out_line(text));
        } else {
            out_line(text);
        }
    }

    fn progress(&mut self, label: &str, view: &ProgressView) {
        if self.mode == ProgressMode::Quiet {
            return;
        }
        if !self.shown.contains_key(label) {
            let shown = Shown { bar: self.new_bar(label, view.total), last_line: None };
            self.shown.insert(label.to_string(), shown);
        }
        let Some(shown) = self.shown.get_mut(label) else { return };
        match &shown.bar {
            Some(bar) => {
                bar.set_length(view.total);
                bar.set_position(view.done.min(view.total));
                bar.set_message(view.details());
            }
            None => {
                // The first report (0 bytes) is not worth a line; the first with data is (it
                // says when data began to flow); then about once a second.
                let due = match shown.last_line {
                    None => view.done > 0,
                    Some(last) => last.elapsed() >= LINE_INTERVAL,
                };
                if due && view.done < view.total {
                    shown.last_line = Some(Instant::now());
                    out_line(&format!("[PROGRESS] {label} {}", view.line()));
                }
            }
        }
    }

    fn finish(&mut self, label: &str) {
        if let Some(Shown { bar: Some(bar), .. }) = self.shown.remove(label) {
            bar.finish_and_clear();
            self.bars.remove(&bar);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_counts_bytes_sent_now_and_progress_stays_within_the_total() {
        let view = ProgressView {
            done: 60 << 20,
            total: 60 << 20,
            sent_now: 20 << 20,
            elapsed: Duration::from_secs(1),
            files_done: 1,
            files: 1,
            current: None,
        };
        assert_eq!(human_rate(view.rate()), "20.0 MiB/s");
        assert_eq!(view.percent(), 100.0);
        assert_eq!(view.eta(), Some(Duration::ZERO));
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_duration(Duration::from_secs(185)), "3 min 5 s");
        assert!(!view.line().contains('\x1b'));
    }
}
