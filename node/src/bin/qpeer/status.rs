//! `qpeer status`: what runs on a home.
//!
//! A running `qpeer listen` answers on its control socket ([`listener`]). A one-shot command
//! running a node of its own (`qpeer send` with no listener) serves no socket; it keeps a
//! small status file, `HOME/oneshot.json` ([`OneShot`]), with its pid, command and transfers,
//! rewritten about once a second and removed when it ends. `status` reads it when no listener
//! answers ([`not_listening`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qpeer_node::Node;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::progress::{human_duration, out_line};
use crate::render::{ms, Output};
use crate::transfers::{TransferRow, Transfers};

/// The one-shot status file in a home.
pub const ONESHOT_FILE: &str = "oneshot.json";

/// How often a one-shot command rewrites its status file.
const ONESHOT_REFRESH: Duration = Duration::from_secs(1);

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `2026-12-02 02:14:03 UTC` for seconds since the Unix epoch.
pub fn utc(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// `2026-12-02 02:14:03 UTC (3 min 5 s ago)`.
pub fn when(epoch: u64) -> String {
    let now = unix_now();
    if epoch > now {
        return utc(epoch);
    }
    format!("{} ({} ago)", utc(epoch), human_duration(Duration::from_secs(now - epoch)))
}

/// The running listener's status, as lines or one JSON object.
pub fn listener(node: &Node, tracker: &str, transfers: &[TransferRow], json: bool, out: &dyn Output) {
    let peers = node.peers();
    if json {
        let home_tracker = node.home_tracker().map(|home| {
            json!({
                "id": home.id.map(|id| id.to_string()),
                "host_port": home.host_port,
                "addr": home.addr.to_string(),
            })
        });
        let object = json!({
            "state": "listening",
            "pid": std::process::id(),
            "id": node.id().to_string(),
            "home": node.home().display().to_string(),
            "tracker": tracker,
            "home_tracker": home_tracker,
            "record": node.record_state().to_string(),
            "observed": node.observed_addr().map(|a| a.to_string()),
            "registrations": node.registrations(),
            "socket": node.local_addr().to_string(),
            "peers": peers.iter().map(|peer| {
                let (path, since) = peer.path_since();
                json!({
                    "id": peer.node_id().to_string(),
                    "path": path.to_string(),
                    "direct": matches!(path, qpeer_node::PeerPath::Direct(_)),
                    "rtt_ms": ms(peer.rtt()),
                    "path_age_s": since.elapsed().as_secs_f64(),
                })
            }).collect::<Vec<_>>(),
            "transfers": transfers.iter().map(TransferRow::json).collect::<Vec<_>>(),
        });
        out.line(&object.to_string());
        return;
    }
    out.line(&format!("node:     {} (running, home {})", node.id(), node.home().display()));
    out.line(&format!("tracker:  {tracker}"));
    match node.home_tracker() {
        Some(home) => out.line(&format!(
            "home:     {} at {} ({})",
            home.id.map_or_else(|| "a CA-verified tracker".to_string(), |id| id.to_string()),
            home.host_port,
            home.addr
        )),
        None => out.line("home:     - (not registered yet)"),
    }
    out.line(&format!("record:   {}", node.record_state()));
    match node.observed_addr() {
        Some(addr) => out.line(&format!("observed: {addr} (registered {} time(s))", node.registrations())),
        None => out.line("observed: - (not registered right now)"),
    }
    out.line(&format!("socket:   {}", node.local_addr()));
    out.line(&format!("peers:    {}", peers.len()));
    for peer in peers {
        let (path, since) = peer.path_since();
        out.line(&format!(
            "  {} {path} rtt {:.1} ms, path since {:.1} s",
            peer.node_id(),
            ms(peer.rtt()),
            since.elapsed().as_secs_f64()
        ));
    }
    out.line(&format!("transfers: {}", transfers.len()));
    for t in transfers {
        out.line(&format!("  {}", t.line()));
    }
}

/// A one-shot command's status file, rewritten while it runs and removed when dropped.
pub struct OneShot {
    path: PathBuf,
    stop: CancellationToken,
}

impl OneShot {
    /// Registers `command` (`send`, `ping`, `peers`) running on `node` as this process.
    pub fn register(node: &Node, command: &str, peer: Option<&str>, transfers: Arc<Transfers>) -> Self {
        let path = node.home().join(ONESHOT_FILE);
        let stop = CancellationToken::new();
        let base = json!({
            "state": "one-shot",
            "pid": std::process::id(),
            "command": command,
            "peer": peer,
            "id": node.id().to_string(),
            "home": node.home().display().to_string(),
            "started": unix_now(),
            "socket": node.local_addr().to_string(),
        });
        let write = {
            let path = path.clone();
            move |transfers: &Transfers| {
                let mut object = base.clone();
                object["transfers"] = Value::Array(transfers.rows().iter().map(TransferRow::json).collect());
                let tmp = path.with_extension("json.tmp");
                if std::fs::write(&tmp, object.to_string())
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .is_err()
                {
                    tracing::debug!("cannot write {}", path.display());
                }
            }
        };
        write(&transfers);
        let cancel = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(ONESHOT_REFRESH) => write(&transfers),
                }
            }
        });
        Self { path, stop }
    }
}

impl Drop for OneShot {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether process `pid` still runs (and is not a zombie).
fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The status file of a one-shot command still running on `home`.
pub fn one_shot_running(home: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(home.join(ONESHOT_FILE)).ok()?;
    let object: Value = serde_json::from_str(&text).ok()?;
    alive(object["pid"].as_u64()?).then_some(object)
}

/// Why a command cannot run on `home` whose lock another process holds without serving a
/// control socket.
pub fn busy(home: &Path) -> String {
    let what = match one_shot_running(home) {
        Some(object) => format!(
            "a one-shot `qpeer {}` (pid {}) is running on {}",
            object["command"].as_str().unwrap_or("command"),
            object["pid"],
            home.display()
        ),
        None => format!("a qpeer command is already running on {}", home.display()),
    };
    format!(
        "{what} with a node of its own, and only `qpeer listen` runs other commands for them; wait \
         for it to finish (or run `qpeer listen` on this home for commands to share one node)"
    )
}

/// `qpeer status` when no listener answers: a one-shot command's status file, or "not
/// running" (exit `not_running`).
pub fn not_listening(home: &Path, json: bool, not_running: u8) -> ExitCode {
    let Some(object) = one_shot_running(home) else {
        if json {
            out_line(&json!({ "state": "not running", "home": home.display().to_string() }).to_string());
        } else {
            out_line(&format!("node:     not running on {}", home.display()));
        }
        return ExitCode::from(not_running);
    };
    if json {
        out_line(&object.to_string());
        return ExitCode::SUCCESS;
    }
    let text = |key: &str| object[key].as_str().unwrap_or("-").to_string();
    out_line(&format!(
        "node:     {} (a one-shot `qpeer {}` runs it as pid {}, home {}; no `qpeer listen` runs here)",
        text("id"),
        text("command"),
        object["pid"],
        home.display()
    ));
    if let Some(started) = object["started"].as_u64() {
        out_line(&format!("started:  {}", when(started)));
    }
    if let Some(peer) = object["peer"].as_str() {
        out_line(&format!("peer:     {peer}"));
    }
    let transfers = object["transfers"].as_array().cloned().unwrap_or_default();
    out_line(&format!("transfers: {}", transfers.len()));
    for t in transfers {
        let n = |key: &str| t[key].as_u64().unwrap_or(0);
        let percent = if n("total_bytes") == 0 {
            100.0
        } else {
            n("done_bytes") as f64 * 100.0 / n("total_bytes") as f64
        };
        out_line(&format!(
            "  {} {} {}: {}/{} bytes ({percent:.0}%), {}/{} files",
            t["direction"].as_str().unwrap_or("-"),
            if t["direction"] == "sending" { "to" } else { "from" },
            t["peer"].as_str().unwrap_or("-"),
            n("done_bytes"),
            n("total_bytes"),
            n("files_done"),
            n("files"),
        ));
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_read_as_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_796_154_243), "2026-12-01 19:44:03 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
