//! `qpeer demo`: a tracker and two nodes in this process, on loopback, with temporary homes;
//! alice sends bob a generated file, which bob verifies by BLAKE3.
//!
//! Each line says who printed it (`tracker │`, `alice   │`, `bob     │`, `demo    │`): every
//! party has a console of its own, all drawing on one terminal. Paths inside the temporary
//! directory are shown relative to it, since it is removed when the demo ends.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use qpeer_certs::Identity;
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::{hash_file, scan};
use qpeer_node::transfer::send::send;
use qpeer_node::{Events, Node};
use qpeer_tracker::{ServerEvents, TrackerAddr};

use crate::progress::{mib, ProgressMode, ProgressView, Terminal};
use crate::render::{hex, Console, Output, Sink};

/// One party's lines on the shared terminal, after its name.
struct Party {
    prefix: String,
    /// The scratch directory's path and separator, cut from lines (it is gone after the demo).
    scratch: String,
    terminal: Arc<Mutex<Terminal>>,
}

impl Party {
    fn console(
        name: &str,
        events: &Events,
        scratch: &Path,
        terminal: &Arc<Mutex<Terminal>>,
    ) -> Arc<Console<Party>> {
        let party = Party {
            prefix: format!("{name:<7} │ "),
            scratch: format!("{}/", scratch.display()),
            terminal: terminal.clone(),
        };
        Console::start(events, party, true)
    }
}

impl Sink for Party {
    fn line(&mut self, text: &str) {
        let text = text.replace(&self.scratch, "");
        let mut terminal = self.terminal.lock();
        // A tracker event may be several lines.
        for line in text.lines() {
            terminal.line(&format!("{}{line}", self.prefix));
        }
    }

    fn progress(&mut self, label: &str, view: &ProgressView) {
        self.terminal.lock().progress(label, view);
    }

    fn finish(&mut self, label: &str) {
        self.terminal.lock().finish(label);
    }
}

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
async fn show_tracker(mut events: ServerEvents, console: Arc<Console<Party>>) {
    while let Some(event) = events.recv().await {
        console.line(&event.to_string());
    }
}

pub async fn run() -> Result<()> {
    let scratch = tempfile::tempdir().context("cannot create a temporary directory")?;
    let terminal = Arc::new(Mutex::new(Terminal::new(ProgressMode::detect(false))));
    // The demo's own lines, and the tracker's (through a console, so that they keep their
    // place among the nodes' lines).
    let console = Party::console("demo", &Events::new(), scratch.path(), &terminal);
    let tracker_console = Party::console("tracker", &Events::new(), scratch.path(), &terminal);
    console.line("a tracker and two nodes, alice and bob, on 127.0.0.1; files in a temporary directory removed at the end");
    let tracker_identity = Arc::new(Identity::load_or_create(&scratch.path().join("tracker"))?);
    let mut config = qpeer_tracker::TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), tracker_identity);
    config.console = true;
    let mut tracker = qpeer_tracker::Tracker::bind(config)?;
    let tracker_events = tracker.events().context("the tracker keeps no console events")?;
    let tracker_console = tokio::spawn(show_tracker(tracker_events, tracker_console));
    let tracker_addr: TrackerAddr = tracker.tracker_string().parse()?;
    let (stop_tracker, tracker_stopped) = tokio::sync::oneshot::channel::<()>();
    let tracker_task = tokio::spawn(tracker.run(async {
        let _ = tracker_stopped.await;
    }));

    let mut nodes = Vec::new();
    let mut consoles = Vec::new();
    for name in ["alice", "bob"] {
        let events = Events::new();
        let node_console = Party::console(name, &events, scratch.path(), &terminal);
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
        node_console.flush();
        nodes.push(node);
        consoles.push((node_console, events));
    }
    let (alice, bob) = (&nodes[0], &nodes[1]);
    let ((alice_console, alice_events), (bob_console, bob_events)) = (&consoles[0], &consoles[1]);
    alice_console.name(bob.id(), "bob");
    bob_console.name(alice.id(), "alice");
    let flush = || {
        for (node_console, _) in &consoles {
            node_console.flush();
        }
    };

    // Bob receives into inbox/, from alice only.
    let inbox = scratch.path().join("inbox");
    let receiver = Receiver::new(ReceiveConfig {
        out: Some(inbox.clone()),
        policy: AcceptPolicy::Only([alice.id()].into_iter().collect()),
        events: bob_events.clone(),
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
    console.line(&format!(
        "alice connects to bob: the tracker opens a relay for them at once, as a fallback, \
         while they punch a direct path; then alice sends demo-payload.bin ({DEMO_FILE_MIB} MiB)"
    ));
    let sending = async {
        let conn = alice.connect(bob.id()).await?;
        flush();
        console.line(&format!(
            "connected {}; ping: {:.2} ms",
            conn.path(),
            conn.ping(1).await?.as_secs_f64() * 1000.0
        ));
        let paths = vec![source.clone()];
        let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
        anyhow::Ok(send(&conn, plan, alice_events).await?)
    };
    let result = tokio::select! {
        result = sending => result,
        _ = serving => Err(anyhow::anyhow!("bob stopped accepting")),
    };
    for node in &nodes {
        node.shutdown().await;
        flush();
    }
    let _ = stop_tracker.send(());
    let _ = tracker_task.await;
    // The tracker's lines end with it; should a sender outlive it, the demo still ends.
    match tokio::time::timeout(Duration::from_secs(5), tracker_console).await {
        Ok(shown) => shown.context("the tracker's console task failed")?,
        Err(_) => tracing::warn!("the tracker's events did not end with it"),
    }
    let report = result?;
    alice_console.line(&format!(
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
        "verified: bob's inbox/demo-payload.bin is byte-identical to what alice sent (blake3 {})",
        hex(&sent_hash)
    ));
    drop(receiver);
    scratch.close().context("cannot remove the demo's temporary directory")?;
    console.line("done; the temporary directory is removed");
    Ok(())
}
