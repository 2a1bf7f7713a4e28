//! Real `qpeer-tracker` / `qpeer` processes on loopback, for tests that kill and restart them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::{bin_dir, Lines};

/// A child process whose stdout/stderr lines are collected; killed on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn start(program: &Path, args: &[String]) -> Result<Self> {
        let mut command = Command::new(program);
        command.args(args);
        Self::spawn(command).with_context(|| format!("cannot start {}", program.display()))
    }

    /// Spawns `command` with RUST_LOG passed on, no stdin, and its output collected.
    pub fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = Lines::default();
        let stderr = Lines::default();
        stdout.collect_from(child.stdout.take().context("stdout")?);
        stderr.collect_from(child.stderr.take().context("stderr")?);
        Ok(Self { child, stdout, stderr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for exit (killing after `timeout`); the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("still running after {timeout:?}\n{}\n{}", self.stdout.text(), self.stderr.text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tracker binary on 127.0.0.1 with its own home.
pub struct TrackerProc {
    pub proc: Proc,
    pub home: PathBuf,
    pub addr: String,
    pub tracker: qpeer_tracker::TrackerAddr,
    extra: Vec<String>,
}

impl TrackerProc {
    pub fn start(home: &Path, listen: &str, extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut args =
            vec!["--listen".to_string(), listen.into(), "--home".into(), home.display().to_string()];
        args.extend(extra.iter().cloned());
        let proc = Proc::start(&bin_dir()?.join("qpeer-tracker"), &args)?;
        let line = proc.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[TRACKER] "))?;
        let text = line.trim_start_matches("[TRACKER] ").to_string();
        let tracker: qpeer_tracker::TrackerAddr = text.parse()?;
        let addr = format!("{}:{}", tracker.host, tracker.port);
        Ok(Self { proc, home: home.to_path_buf(), addr, tracker, extra })
    }

    /// Starts again on the same address and home.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        *self = Self::start(&self.home.clone(), &self.addr.clone(), &extra)?;
        Ok(())
    }
}

impl Lines {
    /// Collects lines from a reader on a thread.
    pub fn collect_from(&self, reader: impl std::io::Read + Send + 'static) {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                lines.push(line);
            }
        });
    }
}
