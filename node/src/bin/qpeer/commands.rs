//! The user-facing commands (`ping`, `peers`, `send`, `status`), written once against an
//! [`Output`] so they print the same lines whether they run in their own process or inside
//! the running node on behalf of a client of its control socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use qpeer_certs::NodeId;
use qpeer_node::transfer::receive::ActiveReceive;
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::send;
use qpeer_node::Node;
use qpeer_wire::control::Command;

use crate::progress::mib;
use crate::render::{ms, Output};

/// Runs a one-shot command (`status` needs what only a listener knows: see [`status`]).
pub async fn run(node: &Node, command: Command, out: &dyn Output) -> Result<()> {
    match command {
        Command::Ping { peer, count, interval_ms } => {
            ping(node, peer, count, Duration::from_millis(interval_ms), out).await
        }
        Command::Peers => peers(node, out).await,
        Command::Send { peer, paths, quiet } => send_files(node, peer, paths, quiet, out).await,
        Command::Status => Ok(()),
    }
}

/// `qpeer ping`: connect and time `count` round trips, each reply with the path it took.
pub async fn ping(node: &Node, peer: NodeId, count: u32, interval: Duration, out: &dyn Output) -> Result<()> {
    let conn = node.connect(peer).await?;
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
        bail!("no ping reply from {peer}");
    }
    Ok(())
}

/// `qpeer peers`: the tracker's directory, one node per line, id first.
pub async fn peers(node: &Node, out: &dyn Output) -> Result<()> {
    for peer in node.list_peers().await? {
        let name = peer.name.as_deref().map(|n| qpeer_wire::printable(n, 64)).unwrap_or("-".into());
        out.line(&format!("{} {name} registered_at={}", peer.node_id, peer.registered_at));
    }
    Ok(())
}

/// `qpeer send`: offer `paths` (absolute) to `peer` and stream them; fails unless every file
/// was verified by the receiver. Progress and retries are reported on `out`'s events.
pub async fn send_files(
    node: &Node,
    peer: NodeId,
    paths: Vec<PathBuf>,
    quiet: bool,
    out: &dyn Output,
) -> Result<()> {
    // Walk the paths while the connection is being made: both take time, neither needs
    // the other.
    let scanning = async { anyhow::Ok(tokio::task::spawn_blocking(move || scan(&paths)).await??) };
    let (plan, conn) = tokio::join!(scanning, node.connect(peer));
    let plan = plan?;
    let conn = conn?;
    for (path, reason) in &plan.skipped {
        if !quiet {
            out.line(&format!("[SKIPPED] {}: {reason}", path.display()));
        }
    }
    let report = send(&conn, plan, out.events()).await?;
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
pub fn status(node: &Node, tracker: &str, transfers: &[ActiveReceive], out: &dyn Output) {
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
    for t in transfers {
        out.line(&format!(
            "  receiving from {}: {}/{} files verified, {}/{} bytes, into {}",
            t.peer,
            t.verified_files,
            t.files,
            t.verified_bytes,
            t.bytes,
            t.into.display()
        ));
    }
}
