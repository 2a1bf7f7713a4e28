//! Embedding qpeer in an application: a tracker and two nodes in one process, on loopback.
//! `alice` connects to `bob` by NodeId and sends him a file; both nodes' events are printed
//! as they come, in the application's own words. Nothing here comes from the `qpeer` binary.
//!
//! Run with `cargo run -p qpeer-node --example embed`. Across machines, each node only needs
//! the tracker's `ID@HOST:PORT` (`Node::builder().tracker(addr)`), and the tracker runs as
//! `qpeer-tracker`.

use std::sync::Arc;
use std::time::Duration;

use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::send;
use qpeer_node::transfer::TransferEvent;
use qpeer_node::{Events, Node, NodeEvent};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main]
async fn main() -> Result<()> {
    // A tracker of our own, stopped at the end.
    let tracker_identity = Arc::new(qpeer_certs::Identity::generate()?);
    let tracker = qpeer_tracker::Tracker::bind(qpeer_tracker::TrackerConfig::new(
        "127.0.0.1:0".parse()?,
        tracker_identity,
    ))?;
    let tracker_addr: qpeer_tracker::TrackerAddr = tracker.tracker_string().parse()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(tracker.run(stop.clone().cancelled_owned()));

    // Each node gets an event channel we subscribe to before it starts, so nothing is missed.
    let (alice_events, bob_events) = (Events::new(), Events::new());
    let printers = [print_events("alice", &alice_events), print_events("bob", &bob_events)];
    let (alice_home, bob_home, inbox) = (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    let node = |home: &std::path::Path, events: &Events| {
        Node::builder()
            .home(home)
            .bind_addr("127.0.0.1:0".parse().expect("an address"))
            .tracker(tracker_addr.clone())
            .events(events.clone())
            .bind()
    };
    let alice = node(alice_home.path(), &alice_events).await?;
    let bob = node(bob_home.path(), &bob_events).await?;
    alice.registered(Duration::from_secs(10)).await?;
    bob.registered(Duration::from_secs(10)).await?;

    // Bob takes files from anyone into `inbox`, on every connection a peer opens.
    let receiver = Receiver::new(ReceiveConfig {
        out: Some(inbox.path().to_path_buf()),
        policy: AcceptPolicy::Any,
        events: bob_events.clone(),
    });
    let accepting = bob.accept_handle();
    let serve = tokio::spawn(async move {
        while let Some(conn) = accepting.accept().await {
            tokio::spawn(receiver.clone().serve(conn));
        }
    });

    // Alice sends a file to Bob's NodeId.
    let file = alice_home.path().join("hello.txt");
    std::fs::write(&file, b"hello from alice\n".repeat(1000))?;
    let conn = alice.connect(bob.id()).await?;
    let report = send(&conn, scan(&[file])?, &alice_events).await?;
    println!("app: sent {} file(s), {} bytes, in {:?}", report.files, report.total_bytes, report.elapsed);
    let received = std::fs::read(inbox.path().join("hello.txt"))?;
    println!("app: bob's copy has {} bytes", received.len());

    alice.shutdown().await;
    bob.shutdown().await;
    serve.abort();
    stop.cancel();
    serving.await?;
    drop((alice, bob));
    for printer in printers {
        printer.abort();
    }
    Ok(())
}

/// Prints one node's events until the program ends.
fn print_events(name: &'static str, events: &Events) -> tokio::task::JoinHandle<()> {
    let mut events = events.subscribe();
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                // A printer that fell behind skips what it missed and goes on.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    println!("{name}: ({missed} events not shown)");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            match event {
                NodeEvent::Registered { observed, .. } => println!("{name}: registered, seen at {observed}"),
                NodeEvent::PeerConnected { peer, path, rtt } => {
                    println!("{name}: connected to {} over {path} (rtt {rtt:?})", peer.short())
                }
                NodeEvent::PathChanged { peer, path, .. } => {
                    println!("{name}: {} now over {path}", peer.short())
                }
                NodeEvent::Transfer(TransferEvent::OfferAccepted { peer, files, bytes, .. }) => {
                    println!("{name}: accepted {files} file(s), {bytes} bytes from {}", peer.short())
                }
                NodeEvent::Transfer(TransferEvent::Received { path, size, .. }) => {
                    println!("{name}: received {} ({size} bytes, verified)", path.display())
                }
                NodeEvent::Transfer(TransferEvent::Progress(progress)) => {
                    println!("{name}: {}/{} bytes", progress.done, progress.total)
                }
                NodeEvent::Transfer(TransferEvent::Sent { peer, report, .. }) => {
                    println!("{name}: {} verified all {} file(s)", peer.short(), report.files)
                }
                NodeEvent::Transfer(TransferEvent::ReceiveEnded { peer, files, bytes, .. }) => {
                    println!("{name}: transfer from {} ended: {files} file(s), {bytes} bytes", peer.short())
                }
                NodeEvent::PeerDisconnected { peer, reason } => {
                    println!("{name}: {} gone ({reason})", peer.short())
                }
                other => println!("{name}: {other:?}"),
            }
        }
    })
}
