//! File transfer between two in-process nodes on loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Result};
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::{send, SendReport};
use qpeer_node::transfer::TransferError;
use qpeer_node::Events;
use qpeer_tests::{node, TestNode, TestTracker};
use qpeer_wire::io::{write_frame, FrameReader};
use qpeer_wire::peer::StreamKind;
use qpeer_wire::tracker::MAX_FRAME_LEN;
use qpeer_wire::transfer::{ControlFrame, EntryKind, OfferEntry, TRANSFER_VERSION};

/// A node that receives into `out` under `policy`, serving every connection it accepts.
async fn receiver(
    tracker: &TestTracker,
    out: &Path,
    policy: AcceptPolicy,
) -> Result<(TestNode, tokio::task::JoinHandle<()>)> {
    let node = node(tracker).await?;
    let receiver =
        Receiver::new(ReceiveConfig { out: Some(out.to_path_buf()), policy, events: Events::new() });
    let accepting = node.node.accept_handle();
    let task = tokio::spawn(async move {
        while let Some(conn) = accepting.accept().await {
            tokio::spawn(receiver.clone().serve(conn));
        }
    });
    Ok((node, task))
}

async fn send_paths(
    from: &qpeer_node::Node,
    to: qpeer_certs::NodeId,
    paths: Vec<PathBuf>,
) -> Result<SendReport, TransferError> {
    let plan = tokio::task::spawn_blocking(move || scan(&paths)).await.expect("scan task")?;
    let conn = from.connect(to).await?;
    send(&conn, plan, &Events::new()).await
}

fn allow(id: qpeer_certs::NodeId) -> AcceptPolicy {
    AcceptPolicy::Only([id].into_iter().collect())
}

#[tokio::test]
async fn a_large_file_and_a_directory_tree_arrive_identical() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let big = src.path().join("big.bin");
    qpeer_tests::write_random(&big, 100 << 20, 1)?;
    let tree = src.path().join("trëe");
    qpeer_tests::write_random(&tree.join("a/b/c/deep.bin"), 300_000, 2)?;
    qpeer_tests::write_random(&tree.join("日本語 ファイル.txt"), 1234, 3)?;
    std::fs::write(tree.join("a/empty"), b"")?;
    std::fs::create_dir_all(tree.join("empty dir"))?;

    let sender = node(&tracker).await?;
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender.id())).await?;
    let report = send_paths(&sender, recv.id(), vec![big.clone(), tree.clone()]).await?;
    assert_eq!(report.files, 4);
    assert_eq!(report.total_bytes, (100 << 20) + 300_000 + 1234);
    qpeer_tests::assert_same_tree(&big, &out.path().join("big.bin"))?;
    qpeer_tests::assert_same_tree(&tree, &out.path().join("trëe"))?;
    let leftovers: Vec<_> =
        walk(out.path()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "part")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Sending the same again: everything is already there, nothing is overwritten or resent.
    let again = send_paths(&sender, recv.id(), vec![big, tree]).await?;
    assert_eq!(again.sent_bytes, 0);
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_transfer_killed_halfway_resumes_and_completes() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let file = src.path().join("resume.bin");
    let size: u64 = 64 << 20;
    qpeer_tests::write_random(&file, size as usize, 4)?;
    let sender_home = tempfile::tempdir()?;
    let sender_id = qpeer_certs::Identity::load_or_create(sender_home.path())?.node_id();
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender_id)).await?;

    let first = qpeer_tests::node_in_home(&tracker, sender_home.path()).await?;
    let part = out.path().join("resume.bin.part");
    let sending = tokio::spawn({
        let to = recv.id();
        let file = file.clone();
        let conn = first.connect(to).await?;
        async move {
            let paths = vec![file];
            let plan = tokio::task::spawn_blocking(move || scan(&paths)).await.expect("scan")?;
            send(&conn, plan, &Events::new()).await
        }
    });
    // Kill the sender when the receiver holds about half.
    let mut held = 0;
    for _ in 0..2000 {
        held = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if held >= size / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ensure!(held >= size / 2, "the transfer never reached half ({held} bytes)");
    sending.abort();
    first.shutdown().await;
    drop(first);
    // The receiver keeps what arrived.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kept = std::fs::metadata(&part)?.len();
    ensure!(kept >= size / 2 && kept < size, "kept {kept} of {size}");

    let second = qpeer_tests::node_in_home(&tracker, sender_home.path()).await?;
    let report = send_paths(&second, recv.id(), vec![file.clone()]).await?;
    assert!(
        report.sent_bytes <= size - kept,
        "resumed: sent {} of {size}, {kept} were kept",
        report.sent_bytes
    );
    qpeer_tests::assert_same_tree(&file, &out.path().join("resume.bin"))?;
    assert!(!part.exists());
    Ok(())
}

#[tokio::test]
async fn a_corrupt_part_file_is_detected_and_fetched_again() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let file = src.path().join("data.bin");
    let size: u64 = 4 << 20;
    qpeer_tests::write_random(&file, size as usize, 5)?;
    // A .part whose first MiB is not the file's first MiB.
    qpeer_tests::write_random(&out.path().join("data.bin.part"), 1 << 20, 99)?;

    let sender = node(&tracker).await?;
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender.id())).await?;
    let report = send_paths(&sender, recv.id(), vec![file.clone()]).await?;
    // First attempt resumed after the bad MiB, failed verification, second sent everything.
    assert_eq!(report.sent_bytes, (size - (1 << 20)) + size);
    qpeer_tests::assert_same_tree(&file, &out.path().join("data.bin"))?;
    Ok(())
}

#[tokio::test]
async fn an_unknown_sender_is_refused_by_default() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    qpeer_tests::write_random(&src.path().join("f"), 10, 6)?;
    let (recv, _task) = receiver(&tracker, out.path(), AcceptPolicy::Only(Default::default())).await?;
    let sender = node(&tracker).await?;
    match send_paths(&sender, recv.id(), vec![src.path().join("f")]).await {
        Err(TransferError::Rejected(reason)) => {
            assert!(reason.contains("not allowed") && reason.contains(&sender.id().to_string()), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(std::fs::read_dir(out.path())?.next().is_none(), "nothing may be written");
    Ok(())
}

#[tokio::test]
async fn an_existing_file_is_never_overwritten() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    qpeer_tests::write_random(&src.path().join("f"), 1000, 7)?;
    std::fs::write(out.path().join("f"), b"precious")?;
    let sender = node(&tracker).await?;
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender.id())).await?;
    match send_paths(&sender, recv.id(), vec![src.path().join("f")]).await {
        Err(TransferError::FilesFailed { failures, .. }) => {
            assert!(failures[0].1.contains("not overwritten"), "{failures:?}")
        }
        other => panic!("expected a per-file refusal, got {other:?}"),
    }
    assert_eq!(std::fs::read(out.path().join("f"))?, b"precious");
    Ok(())
}

#[tokio::test]
async fn a_file_already_there_is_confirmed_by_hash_not_sent_and_a_same_size_other_file_is_kept() -> Result<()>
{
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let same = src.path().join("same.bin");
    qpeer_tests::write_random(&same, 3 << 20, 8)?;
    std::fs::copy(&same, out.path().join("same.bin"))?;
    let sender = node(&tracker).await?;
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender.id())).await?;
    let report = send_paths(&sender, recv.id(), vec![same.clone()]).await?;
    assert_eq!(report.sent_bytes, 0, "the receiver already holds it");
    assert_eq!(report.total_bytes, 3 << 20);

    // Same size, other bytes: refused, and the receiver's file is untouched.
    let other = src.path().join("other.bin");
    qpeer_tests::write_random(&other, 1 << 20, 9)?;
    let theirs = out.path().join("other.bin");
    qpeer_tests::write_random(&theirs, 1 << 20, 10)?;
    let before = std::fs::read(&theirs)?;
    match send_paths(&sender, recv.id(), vec![other]).await {
        Err(TransferError::FilesFailed { failures, .. }) => {
            assert!(
                failures[0].1.contains("other content") && failures[0].1.contains("not overwritten"),
                "{failures:?}"
            )
        }
        other => panic!("expected a per-file refusal, got {other:?}"),
    }
    assert_eq!(std::fs::read(&theirs)?, before);
    Ok(())
}

#[tokio::test]
async fn a_file_that_changes_while_it_is_sent_is_reported_not_delivered() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let file = src.path().join("growing.log");
    qpeer_tests::write_random(&file, 1 << 20, 11)?;
    let sender = node(&tracker).await?;
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender.id())).await?;
    let plan = {
        let paths = vec![file.clone()];
        tokio::task::spawn_blocking(move || scan(&paths)).await??
    };
    // Changed after the offer was built, before its bytes are read.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&file)?;
        f.write_all(b"one more line\n")?;
    }
    let conn = sender.connect(recv.id()).await?;
    match send(&conn, plan, &Events::new()).await {
        Err(TransferError::FilesFailed { failures, .. }) => {
            assert!(failures[0].1.contains("changed while it was sent"), "{failures:?}")
        }
        other => panic!("expected the change to be reported, got {other:?}"),
    }
    assert!(!out.path().join("growing.log").exists(), "a changed file must not be delivered");
    Ok(())
}

/// Sends a hand-made offer and returns the receiver's answer.
async fn raw_offer(entries: Vec<OfferEntry>) -> Result<ControlFrame> {
    let tracker = TestTracker::start()?;
    let out = tempfile::tempdir()?;
    let sender = node(&tracker).await?;
    let (recv, _task) = receiver(&tracker, out.path(), allow(sender.id())).await?;
    let conn = sender.connect(recv.id()).await?;
    let (mut send, recv_stream) = conn.open_stream(StreamKind::Transfer).await?;
    let total_bytes = entries
        .iter()
        .map(|e| match e.kind {
            EntryKind::File { size, .. } => size,
            _ => 0,
        })
        .sum();
    let offer = ControlFrame::Offer {
        version: TRANSFER_VERSION,
        transfer_id: [7; 16],
        entries: entries.len() as u32,
        total_bytes,
    };
    write_frame(&mut send, &offer, MAX_FRAME_LEN).await?;
    write_frame(&mut send, &ControlFrame::Entries(entries), MAX_FRAME_LEN).await?;
    write_frame(&mut send, &ControlFrame::OfferEnd, MAX_FRAME_LEN).await?;
    let mut reader = FrameReader::new(recv_stream, MAX_FRAME_LEN, Duration::from_secs(10));
    let answer = reader.next::<ControlFrame>().await?.expect("an answer");
    ensure!(walk(out.path()).is_empty(), "nothing may be created for a refused offer");
    Ok(answer)
}

#[tokio::test]
async fn hostile_offers_are_refused() -> Result<()> {
    let entry = |path: &str, kind| OfferEntry { path: path.into(), kind, meta: Default::default() };
    let file = |path: &str| entry(path, EntryKind::File { size: 1 });
    for entries in [
        vec![file("../x")],
        vec![file("/etc/x")],
        vec![file("ok/../../x")],
        // A file inside a link: it would be written through the link.
        vec![entry("l", EntryKind::Symlink { target: "d".into() }), file("l/x")],
    ] {
        let shown = format!("{entries:?}");
        match raw_offer(entries).await? {
            ControlFrame::Reject { reason } => assert!(reason.contains("unsafe offer"), "{shown}: {reason}"),
            other => panic!("{shown}: expected a refusal, got {other:?}"),
        }
    }
    Ok(())
}
