//! The user-facing commands (`ping`, `peers`, `send`, `status`), written once against an
//! [`Output`] so they print the same lines whether they run in their own process or inside
//! the running node on behalf of a client of its control socket.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qpeer_certs::NodeId;

use crate::progress::{mib, Progress, ProgressMode};
use crate::transfer::scan::scan;
use crate::transfer::send::send;
use crate::Node;

/// Where a command's output goes.
pub trait Output: Send + Sync {
    /// A line of normal output (stdout).
    fn line(&self, text: &str);
    /// Progress of a transfer: a bar, lines, or nothing, as the viewer chose.
    fn progress(&self, label: &str, total: u64) -> Arc<Progress>;
}

/// Output to this process's stdout.
pub struct Stdout {
    pub mode: ProgressMode,
}

impl Output for Stdout {
    fn line(&self, text: &str) {
        crate::progress::out_line(text);
    }

    fn progress(&self, label: &str, total: u64) -> Arc<Progress> {
        Arc::new(Progress::new(self.mode, label, total))
    }
}

/// A command failed; the message is printed on stderr and the process exits 1.
pub type CommandResult = Result<(), String>;

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// `qpeer ping`: connect and time `count` round trips, each reply with the path it took.
pub async fn ping(
    node: &Node,
    peer: NodeId,
    count: u32,
    interval: Duration,
    out: &dyn Output,
) -> CommandResult {
    let conn = node.connect(peer).await.map_err(|e| e.to_string())?;
    out.line(&format!("PING {peer}: {}", conn.path()));
    let mut rtts = Vec::new();
    for seq in 1..=u64::from(count) {
        if seq > 1 {
            tokio::time::sleep(interval).await;
        }
        match tokio::time::timeout(Duration::from_secs(5), conn.ping(seq)).await {
            Ok(Ok(rtt)) => {
                out.line(&format!(
                    "reply from {} seq={seq} path={} rtt={:.2} ms",
                    peer.short(),
                    conn.path(),
                    ms(rtt)
                ));
                rtts.push(rtt);
            }
            Ok(Err(e)) => out.line(&format!("seq={seq} failed: {e}")),
            Err(_) => out.line(&format!("seq={seq} timed out")),
        }
    }
    let received = rtts.len();
    let mut summary = format!("--- {peer}: {count} sent, {received} received");
    if let (Some(min), Some(max)) = (rtts.iter().min(), rtts.iter().max()) {
        let avg = rtts.iter().sum::<Duration>() / received as u32;
        summary.push_str(&format!(", rtt min/avg/max = {:.2}/{:.2}/{:.2} ms", ms(*min), ms(avg), ms(*max)));
    }
    out.line(&summary);
    if received == 0 {
        return Err(format!("no ping reply from {peer}"));
    }
    Ok(())
}

/// `qpeer peers`: the tracker's directory, one node per line, id first.
pub async fn peers(node: &Node, out: &dyn Output) -> CommandResult {
    for peer in node.list_peers().await.map_err(|e| e.to_string())? {
        let name = peer.name.as_deref().map(|n| qpeer_wire::printable(n, 64)).unwrap_or("-".into());
        out.line(&format!("{} {name} registered_at={}", peer.node_id, peer.registered_at));
    }
    Ok(())
}

/// `qpeer send`: offer `paths` (absolute) to `peer` and stream them; fails unless every file
/// was verified by the receiver.
pub async fn send_files(
    node: &Node,
    peer: NodeId,
    paths: Vec<PathBuf>,
    quiet: bool,
    out: &dyn Output,
) -> CommandResult {
    // Walk the paths while the connection is being made: both take time, neither needs
    // the other.
    let scanning = async {
        tokio::task::spawn_blocking(move || scan(&paths))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    };
    let (plan, conn) = tokio::join!(scanning, node.connect(peer));
    let plan = plan?;
    let conn = conn.map_err(|e| e.to_string())?;
    for (path, reason) in &plan.skipped {
        if !quiet {
            out.line(&format!("[SKIPPED] {}: {reason}", path.display()));
        }
    }
    let progress = out.progress(&format!("to {}", peer.short()), plan.total_bytes);
    let result = send(&conn, plan, progress.clone()).await;
    progress.finish();
    let report = result.map_err(|e| e.to_string())?;
    if report.sent_bytes < report.total_bytes {
        out.line(&format!(
            "[RESUMED] {} bytes were already at the receiver; {} bytes sent now",
            report.total_bytes - report.sent_bytes,
            report.sent_bytes
        ));
    }
    out.line(&format!(
        "[SENT] {} files, {} bytes, {:.1} MiB/s",
        report.files,
        report.total_bytes,
        mib(report.sent_bytes) / report.elapsed.as_secs_f64().max(1e-9)
    ));
    Ok(())
}

/// `qpeer status`: what the running node is doing.
pub fn status(node: &Node, tracker: &str, transfers: &[String], out: &dyn Output) {
    out.line(&format!("node:     {} (running, home {})", node.id(), node.home().display()));
    out.line(&format!("tracker:  {tracker}"));
    match node.observed_addr() {
        Some(addr) => out.line(&format!("observed: {addr} (registered {} time(s))", node.registrations())),
        None => out.line("observed: - (not registered right now)"),
    }
    out.line(&format!("socket:   {}", node.local_addr()));
    let peers = node.peers();
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
    for transfer in transfers {
        out.line(&format!("  {transfer}"));
    }
}
