//! The user-facing commands (`ping`, `peers`, `send`, `status`), written once against an
//! [`Output`] so they print the same lines whether they run in their own process or inside
//! the running node on behalf of a client of its control socket.
//!
//! With `json`, a command prints JSON only (one object per line): `peers` one array of
//! peers, `ping` one object per reply then a summary object, `send` one summary object, and
//! `status` one object.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use qpeer_certs::NodeId;
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::{send, SendReport};
use qpeer_node::Node;
use qpeer_wire::control::Command;
use serde_json::json;

use crate::peer_ref::{self, Aliases};
use crate::progress::{human_bytes, human_duration, human_rate};
use crate::render::{ms, Output};
use crate::status::{self, OneShot};
use crate::transfers::Transfers;

/// Runs a one-shot command (`status` needs what only a listener knows: see [`status`]).
pub async fn run(node: &Node, command: Command, out: &dyn Output) -> Result<()> {
    match command {
        Command::Ping { peer, count, interval_ms, json } => {
            let peer = peer_ref::resolve(node, &peer).await?;
            ping(node, peer, count, Duration::from_millis(interval_ms), json, out).await
        }
        Command::Peers { json } => peers(node, json, out).await,
        Command::Send { peer, paths, json, .. } => {
            let peer = peer_ref::resolve(node, &peer).await?;
            send_files(node, peer, paths, json, out).await
        }
        Command::Status { .. } => Ok(()),
    }
}

/// [`run`] in a node of this process's own: while it runs, `qpeer status` on the home reads
/// what it does from its status file.
pub async fn run_own(node: &Node, command: Command, out: &dyn Output) -> Result<()> {
    let transfers = Transfers::new();
    transfers.watch(out.events());
    let (name, peer) = match &command {
        Command::Ping { peer, .. } => ("ping", Some(peer.as_str())),
        Command::Send { peer, .. } => ("send", Some(peer.as_str())),
        Command::Peers { .. } => ("peers", None),
        Command::Status { .. } => ("status", None),
    };
    let _registered = OneShot::register(node, name, peer, transfers);
    run(node, command, out).await
}

/// `qpeer ping`: connect and time `count` round trips, each reply with the path it took.
pub async fn ping(
    node: &Node,
    peer: NodeId,
    count: u32,
    interval: Duration,
    json: bool,
    out: &dyn Output,
) -> Result<()> {
    let conn = node.connect(peer).await?;
    if !json {
        out.line(&format!("PING {peer}: {}", conn.path()));
    }
    let mut rtts = Vec::new();
    for seq in 1..=u64::from(count) {
        if seq > 1 {
            tokio::time::sleep(interval).await;
        }
        let reply = tokio::time::timeout(Duration::from_secs(5), conn.ping(seq)).await;
        let path = conn.path();
        match reply {
            Ok(Ok(rtt)) => {
                if json {
                    out.line(
                        &json!({
                            "type": "reply", "peer": peer.to_string(), "seq": seq, "path": path.to_string(),
                            "direct": matches!(path, qpeer_node::PeerPath::Direct(_)), "rtt_ms": ms(rtt),
                        })
                        .to_string(),
                    );
                } else {
                    out.line(&format!(
                        "reply from {} seq={seq} path={path} rtt={:.2} ms",
                        peer.short(),
                        ms(rtt)
                    ));
                }
                rtts.push(rtt);
            }
            Ok(Err(e)) if json => out.line(
                &json!({"type": "reply", "peer": peer.to_string(), "seq": seq, "error": e.to_string()})
                    .to_string(),
            ),
            Ok(Err(e)) => out.line(&format!("seq={seq} failed: {e}")),
            Err(_) if json => out.line(
                &json!({"type": "reply", "peer": peer.to_string(), "seq": seq, "error": "timed out"})
                    .to_string(),
            ),
            Err(_) => out.line(&format!("seq={seq} timed out")),
        }
    }
    let received = rtts.len();
    let stats = match (rtts.iter().min(), rtts.iter().max()) {
        (Some(min), Some(max)) => Some((*min, rtts.iter().sum::<Duration>() / received as u32, *max)),
        _ => None,
    };
    if json {
        out.line(
            &json!({
                "type": "summary", "peer": peer.to_string(), "sent": count, "received": received,
                "rtt_min_ms": stats.map(|s| ms(s.0)), "rtt_avg_ms": stats.map(|s| ms(s.1)),
                "rtt_max_ms": stats.map(|s| ms(s.2)),
            })
            .to_string(),
        );
    } else {
        let mut summary = format!("--- {peer}: {count} sent, {received} received");
        if let Some((min, avg, max)) = stats {
            summary.push_str(&format!(", rtt min/avg/max = {:.2}/{:.2}/{:.2} ms", ms(min), ms(avg), ms(max)));
        }
        out.line(&summary);
    }
    if received == 0 {
        bail!("no ping reply from {peer}");
    }
    Ok(())
}

/// `qpeer peers`: the tracker's directory, one node per line, id first (JSON: one array).
pub async fn peers(node: &Node, json: bool, out: &dyn Output) -> Result<()> {
    let aliases = Aliases::load(node.home()).unwrap_or_default();
    let peers = node.list_peers().await?;
    if json {
        let list: Vec<_> = peers
            .iter()
            .map(|peer| {
                json!({
                    "id": peer.node_id.to_string(),
                    "name": peer.name.as_deref().map(|n| qpeer_wire::printable(n, 64)),
                    "aliases": aliases.of(&peer.node_id),
                    "registered_at": peer.registered_at,
                    "registered": status::utc(peer.registered_at),
                    "self": peer.node_id == node.id(),
                })
            })
            .collect();
        out.line(&serde_json::Value::Array(list).to_string());
        return Ok(());
    }
    for peer in peers {
        let name = peer.name.as_deref().map(|n| qpeer_wire::printable(n, 64)).unwrap_or("-".into());
        let mut line = format!("{} {name} registered {}", peer.node_id, status::when(peer.registered_at));
        let aliases = aliases.of(&peer.node_id);
        if !aliases.is_empty() {
            line.push_str(&format!(", alias {}", aliases.join(", ")));
        }
        if peer.node_id == node.id() {
            line.push_str(" (this node)");
        }
        out.line(&line);
    }
    Ok(())
}

/// The `send --json` summary object.
fn send_json(peer: &NodeId, report: Option<&SendReport>, error: Option<&str>) -> String {
    let mut object = json!({ "type": "summary", "peer": peer.to_string(), "ok": error.is_none() });
    if let Some(r) = report {
        object["files"] = json!(r.files);
        object["total_bytes"] = json!(r.total_bytes);
        object["sent_bytes"] = json!(r.sent_bytes);
        object["elapsed_s"] = json!(r.elapsed.as_secs_f64());
        object["rate_bytes_per_s"] = json!(r.rate());
        object["already_there"] = json!(r.already_there);
        object["already_there_bytes"] = json!(r.already_there_bytes);
        object["resumed"] = json!(r.resumed);
        object["resumed_bytes"] = json!(r.resumed_bytes);
        object["retried"] = json!(r.retried);
        object["links"] = json!(r.links);
    }
    if let Some(error) = error {
        object["error"] = json!(error);
    }
    object.to_string()
}

/// New connections a `qpeer send` makes after its connection failed under the transfer.
const RECONNECTS: u32 = 3;

/// Whether `conn` ended by a transport failure (such as quinn's limit on a stream's
/// reassembly gaps) rather than being closed by either side or going silent: a peer that
/// went silent for the idle timeout is gone, and trying again would only delay the error.
fn broke(conn: &qpeer_node::PeerConnection) -> bool {
    use quinn::ConnectionError as E;
    matches!(conn.connection().close_reason(), Some(E::TransportError(_) | E::ConnectionClosed(_) | E::Reset))
}

/// `qpeer send`: offer `paths` (absolute) to `peer` and stream them; fails unless every file
/// was verified by the receiver. Progress and retries are reported on `out`'s events.
pub async fn send_files(
    node: &Node,
    peer: NodeId,
    paths: Vec<PathBuf>,
    json: bool,
    out: &dyn Output,
) -> Result<()> {
    let result = async {
        // Walk the paths while the connection is being made: both take time, neither
        // needs the other.
        let scanning = async { anyhow::Ok(tokio::task::spawn_blocking(move || scan(&paths)).await??) };
        let (plan, conn) = tokio::join!(scanning, node.connect(peer));
        let (plan, mut conn) = (plan?, conn?);
        let mut reconnects = 0;
        loop {
            match send(&conn, plan.clone(), out.events()).await {
                Ok(report) => break anyhow::Ok(report),
                Err(e) if reconnects < RECONNECTS && broke(&conn) => {
                    // The connection failed under the transfer (not closed by either side):
                    // a new one resumes what the receiver kept (its .part files).
                    reconnects += 1;
                    out.line(&format!(
                        "[RECONNECTING] {} ({e}); resuming on a new connection ({reconnects} of {RECONNECTS})",
                        peer.short()
                    ));
                    conn = node.connect(peer).await?;
                }
                Err(e) => break Err(e.into()),
            }
        }
    }
    .await;
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            if json {
                out.line(&send_json(&peer, None, Some(&crate::describe(&e))));
            }
            return Err(e);
        }
    };
    if json {
        out.line(&send_json(&peer, Some(&report), None));
        return Ok(());
    }
    let kept = report.already_there_bytes + report.resumed_bytes;
    if report.sent_bytes == 0 && report.total_bytes > 0 {
        out.line(&format!(
            "[RESUMED] all {} files ({}) were already at the receiver; nothing to send",
            report.files,
            human_bytes(report.total_bytes)
        ));
    } else if kept > 0 {
        out.line(&format!(
            "[RESUMED] {} bytes ({}) were already at the receiver ({} files whole, {} resumed); {} bytes sent now",
            kept,
            human_bytes(kept),
            report.already_there,
            report.resumed,
            report.sent_bytes
        ));
    }
    out.line(&format!(
        "[SENT] {} files, {} bytes ({}) in {}, {}{}",
        report.files,
        report.total_bytes,
        human_bytes(report.total_bytes),
        human_duration(report.elapsed),
        if report.sent_bytes == 0 { "nothing sent now".to_string() } else { human_rate(report.rate()) },
        if report.retried > 0 {
            format!(", {} sent again after a failed check", report.retried)
        } else {
            String::new()
        }
    ));
    Ok(())
}
