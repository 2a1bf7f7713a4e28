//! `qpeer demo`: a tracker and two nodes in this process, on loopback, with temporary homes;
//! alice sends bob a generated file, which bob verifies by BLAKE3.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use qpeer_certs::Identity;
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::{hash_file, scan};
use qpeer_node::transfer::send::send;
use qpeer_node::{Events, Node};
use qpeer_tracker::{ServerEvents, TrackerAddr};

use crate::progress::{mib, ProgressMode, Terminal};
use crate::render::{hex, Console, Output};

const DEMO_FILE_MIB: u64 = 64;

/// Writes `mib` MiB of pseudo-random bytes: BLAKE3's extendable output, fast and
/// incompressible, so no layer can make the transfer look faster than it is.
fn write_demo_file(path: &Path, mib: u64) -> Result<u64> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut stream = blake3::Hasher::new().update(b"qpeer demo file").finalize_xof();
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        stream.fill(&mut block);
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(mib << 20)
}

/// Shows the tracker's lines on the demo's console as they come, until the tracker has
/// stopped (and with it every sender). Through the console, so they keep their place among
/// the nodes' lines.
async fn show_tracker(mut events: ServerEvents, console: Arc<Console<Terminal>>) {
    while let Some(event) = events.recv().await {
        console.line(&event.to_string());
    }
}

pub async fn run() -> Result<()> {
    // Both nodes report on one channel: one console shows them in order.
    let events = Events::new();
    let console = Console::start(&events, Terminal::new(ProgressMode::detect(false)), true);
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let tracker_identity = Arc::new(Identity::load_or_create(&scratch.path().join("tracker"))?);
    let mut config = qpeer_tracker::TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), tracker_identity);
    config.console = true;
    let mut tracker = qpeer_tracker::Tracker::bind(config)?;
    let tracker_events = tracker.events().context("the tracker keeps no console events")?;
    let tracker_console = tokio::spawn(show_tracker(tracker_events, console.clone()));
    let tracker_addr: TrackerAddr = tracker.tracker_string().parse()?;
    let (stop_tracker, tracker_stopped) = tokio::sync::oneshot::channel::<()>();
    let tracker_task = tokio::spawn(tracker.run(async {
        let _ = tracker_stopped.await;
    }));

    let mut nodes = Vec::new();
    for name in ["alice", "bob"] {
        let node = Node::builder()
            .home(scratch.path().join(name))
            .bind_addr((Ipv4Addr::LOCALHOST, 0).into())
            .tracker(tracker_addr.clone())
            .name(name)
            .events(events.clone())
            .bind()
            .await?;
        node.registered(Duration::from_secs(10)).await?;
        // The tracker prints its own lines: keep ours in step with them.
        console.flush();
        nodes.push(node);
    }
    let (alice, bob) = (&nodes[0], &nodes[1]);
    console.name(bob.id(), "bob");

    // Bob receives into inbox/, from alice only.
    let inbox = scratch.path().join("inbox");
    let receiver = Receiver::new(ReceiveConfig {
        out: Some(inbox.clone()),
        policy: AcceptPolicy::Only([alice.id()].into_iter().collect()),
        events: events.clone(),
    });
    let serving = async {
        let mut serving = tokio::task::JoinSet::new();
        while let Some(conn) = bob.accept().await {
            serving.spawn(receiver.clone().serve(conn));
        }
    };

    // Alice sends a generated file.
    let source = scratch.path().join("demo-payload.bin");
    let size = write_demo_file(&source, DEMO_FILE_MIB)?;
    console.line(&format!("[DEMO] alice sends {} ({} MiB) to bob", source.display(), DEMO_FILE_MIB));
    let sending = async {
        let conn = alice.connect(bob.id()).await?;
        console.line(&format!("[DEMO] ping: {:.2} ms", conn.ping(1).await?.as_secs_f64() * 1000.0));
        let paths = vec![source.clone()];
        let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
        anyhow::Ok(send(&conn, plan, &events).await?)
    };
    let result = tokio::select! {
        result = sending => result,
        _ = serving => Err(anyhow::anyhow!("bob stopped accepting")),
    };
    for node in &nodes {
        node.shutdown().await;
        console.flush();
    }
    let _ = stop_tracker.send(());
    let _ = tracker_task.await;
    // The tracker's lines end with it; should a sender outlive it, the demo still ends.
    match tokio::time::timeout(Duration::from_secs(5), tracker_console).await {
        Ok(shown) => shown.context("the tracker's console task failed")?,
        Err(_) => tracing::warn!("the tracker's events did not end with it"),
    }
    let report = result?;
    console.line(&format!(
        "[SENT] {} files, {} bytes, {:.1} MiB/s",
        report.files,
        report.total_bytes,
        mib(report.sent_bytes) / report.elapsed.as_secs_f64().max(1e-9)
    ));
    let received = inbox.join("demo-payload.bin");
    let (sent_hash, got_hash) = (hash_file(&source)?, hash_file(&received)?);
    anyhow::ensure!(sent_hash == got_hash, "the received file differs from the one sent");
    anyhow::ensure!(std::fs::metadata(&received)?.len() == size, "the received file has the wrong size");
    console.line(&format!(
        "[DEMO] verified: {} is byte-identical to what alice sent (blake3 {})",
        received.display(),
        hex(&sent_hash)
    ));
    Ok(())
}
