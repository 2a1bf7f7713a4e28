//! File metadata, symlinks and what transfer events report, between two in-process nodes on
//! loopback: mode bits and mtimes, symlinks inside and outside the tree, never writing
//! through a link, resume and retry progress, refusals on both sides, `--out` checks, small
//! files sent inline in batches.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Result};
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, ReceiveConfigError, Receiver};
use qpeer_node::transfer::scan::{scan, Skipped};
use qpeer_node::transfer::send::{send, SendReport};
use qpeer_node::transfer::{Direction, TransferError, TransferEvent, TransferProgress};
use qpeer_node::{Events, NodeEvent};
use qpeer_tests::{node, TestNode, TestTracker};
use qpeer_wire::io::{write_frame, FrameReader};
use qpeer_wire::peer::StreamKind;
use qpeer_wire::tracker::MAX_FRAME_LEN;
use qpeer_wire::transfer::{
    ControlFrame, EntryKind, FileEnd, FileHeader, FileReply, OfferEntry, INLINE_MAX, TRANSFER_VERSION,
};
use tokio::sync::broadcast;

/// A receiving node (into `out`, from anyone) whose transfer events can be read.
async fn receiver(
    tracker: &TestTracker,
    out: &Path,
) -> Result<(TestNode, broadcast::Receiver<NodeEvent>, tokio::task::JoinHandle<()>)> {
    let node = node(tracker).await?;
    let events = Events::new();
    let rx = events.subscribe();
    let receiver =
        Receiver::new(ReceiveConfig { out: Some(out.to_path_buf()), policy: AcceptPolicy::Any, events });
    let accepting = node.node.accept_handle();
    let task = tokio::spawn(async move {
        while let Some(conn) = accepting.accept().await {
            tokio::spawn(receiver.clone().serve(conn));
        }
    });
    Ok((node, rx, task))
}

/// Sends `paths`; returns the result and every event the send reported.
async fn send_paths(
    from: &qpeer_node::Node,
    to: qpeer_certs::NodeId,
    paths: Vec<PathBuf>,
) -> Result<(Result<SendReport, TransferError>, Vec<TransferEvent>)> {
    let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
    let conn = from.connect(to).await?;
    let events = Events::new();
    let mut rx = events.subscribe();
    let result = send(&conn, plan, &events).await;
    let mut seen = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let NodeEvent::Transfer(event) = event {
            seen.push(event);
        }
    }
    Ok((result, seen))
}

/// The receiver's events up to the end of one transfer (or of a refused offer).
async fn receiver_events(rx: &mut broadcast::Receiver<NodeEvent>) -> Result<Vec<TransferEvent>> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), rx.recv()).await??;
        if let NodeEvent::Transfer(event) = event {
            let end = matches!(event, TransferEvent::ReceiveEnded { .. } | TransferEvent::Rejected { .. });
            seen.push(event);
            if end {
                return Ok(seen);
            }
        }
    }
}

fn progress(events: &[TransferEvent]) -> Vec<&TransferProgress> {
    events
        .iter()
        .filter_map(|e| match e {
            TransferEvent::Progress(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.mode() & 0o7777)
}

fn mtime(path: &Path) -> Result<SystemTime> {
    Ok(std::fs::symlink_metadata(path)?.modified()?)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    Ok(std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?)
}

fn set_mtime(path: &Path, time: SystemTime) -> Result<()> {
    let file = std::fs::File::open(path)?;
    Ok(file.set_times(std::fs::FileTimes::new().set_modified(time))?)
}

fn at(secs: u64, nanos: u32) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
}

#[tokio::test]
async fn mode_bits_and_mtimes_survive_but_setuid_does_not() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let tree = src.path().join("tree");
    std::fs::create_dir_all(tree.join("sub"))?;
    let files = [("run.sh", 0o4755, 0o755), ("ro.txt", 0o444, 0o444), ("sub/secret", 0o600, 0o600)];
    for (n, (name, sent, _)) in files.iter().enumerate() {
        let path = tree.join(name);
        qpeer_tests::write_random(&path, 10_000 + n, n as u64)?;
        set_mtime(&path, at(1_000_000_000 + n as u64, 123_456_789))?;
        set_mode(&path, *sent)?;
    }
    set_mode(&tree.join("sub"), 0o750)?;
    set_mtime(&tree.join("sub"), at(1_200_000_000, 5))?;
    set_mtime(&tree, at(1_300_000_000, 7))?;

    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, out.path()).await?;
    let (report, _) = send_paths(&sender, recv.id(), vec![tree.clone()]).await?;
    assert_eq!(report?.files, 3);
    receiver_events(&mut rx).await?;
    let got = out.path().join("tree");
    qpeer_tests::assert_same_tree(&tree, &got)?;
    for (name, _, want) in files {
        assert_eq!(mode(&got.join(name))?, want, "{name}: setuid/setgid are never set on receive");
        assert_eq!(mtime(&got.join(name))?, mtime(&tree.join(name))?, "{name}");
    }
    assert_eq!(mode(&got.join("sub"))?, 0o750);
    assert_eq!(mtime(&got.join("sub"))?, at(1_200_000_000, 5));
    assert_eq!(mtime(&got)?, at(1_300_000_000, 7));

    // Sent again: all already there (a read-only file included), nothing changed.
    let (again, _) = send_paths(&sender, recv.id(), vec![tree.clone()]).await?;
    let again = again?;
    assert_eq!((again.sent_bytes, again.already_there), (0, 3));
    assert_eq!(mode(&got.join("run.sh"))?, 0o755);
    Ok(())
}

#[tokio::test]
async fn symlinks_inside_the_tree_arrive_as_symlinks_and_others_are_skipped() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let tree = src.path().join("tree");
    std::fs::create_dir_all(tree.join("sub"))?;
    std::fs::write(tree.join("target.txt"), b"hello")?;
    std::fs::write(src.path().join("secret"), b"not to be sent")?;
    let links =
        [("tree/link", "target.txt"), ("tree/sub/up", "../target.txt"), ("tree/dangling", "not/there")];
    for (link, target) in links {
        std::os::unix::fs::symlink(target, src.path().join(link))?;
    }
    std::os::unix::fs::symlink("../secret", tree.join("escapes"))?;
    std::os::unix::fs::symlink(src.path().join("secret"), tree.join("absolute"))?;

    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, out.path()).await?;
    let (report, events) = send_paths(&sender, recv.id(), vec![tree.clone()]).await?;
    let report = report?;
    assert_eq!((report.files, report.links), (1, 3));
    for (link, target) in links {
        let got = out.path().join(link);
        ensure!(std::fs::symlink_metadata(&got)?.file_type().is_symlink(), "{link} is not a symlink");
        assert_eq!(std::fs::read_link(&got)?, Path::new(target));
    }
    assert_eq!(std::fs::read(out.path().join("tree/link"))?, b"hello");
    assert!(std::fs::symlink_metadata(out.path().join("tree/escapes")).is_err());
    assert!(std::fs::symlink_metadata(out.path().join("tree/absolute")).is_err());
    let mut skipped: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TransferEvent::Skipped { path, reason: Skipped::Symlink(_), .. } => path.file_name(),
            _ => None,
        })
        .collect();
    skipped.sort();
    assert_eq!(skipped, ["absolute", "escapes"], "a typed warning for each link not sent");
    let received = receiver_events(&mut rx).await?;
    let linked = received.iter().filter(|e| matches!(e, TransferEvent::Linked { already_here: false, .. }));
    assert_eq!(linked.count(), 3);

    // Again: the same links are there already.
    let (again, _) = send_paths(&sender, recv.id(), vec![tree]).await?;
    assert_eq!(again?.links, 3);
    let received = receiver_events(&mut rx).await?;
    let linked = received.iter().filter(|e| matches!(e, TransferEvent::Linked { already_here: true, .. }));
    assert_eq!(linked.count(), 3);
    Ok(())
}

#[tokio::test]
async fn an_escaping_symlink_is_refused_alone_and_nothing_is_written_outside() -> Result<()> {
    let tracker = TestTracker::start()?;
    let base = tempfile::tempdir()?;
    let out = base.path().join("out");
    std::fs::create_dir(&out)?;
    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, &out).await?;
    let conn = sender.connect(recv.id()).await?;
    let (mut send, recv_stream) = conn.open_stream(StreamKind::Transfer).await?;
    let entry = |path: &str, kind| OfferEntry { path: path.into(), kind, meta: Default::default() };
    let link = |path: &str, target: &str| entry(path, EntryKind::Symlink { target: target.into() });
    let entries = vec![
        entry("d", EntryKind::Directory),
        link("d/ok", "../elsewhere"),
        link("d/up", "../../escaped"),
        link("abs", "/etc/passwd"),
        link("d/s", ".."),
        link("d/t", "s/../../escaped"),
    ];
    let offer =
        ControlFrame::Offer { version: TRANSFER_VERSION, transfer_id: [9; 16], entries: 6, total_bytes: 0 };
    write_frame(&mut send, &offer, MAX_FRAME_LEN).await?;
    write_frame(&mut send, &ControlFrame::Entries(entries), MAX_FRAME_LEN).await?;
    write_frame(&mut send, &ControlFrame::OfferEnd, MAX_FRAME_LEN).await?;
    let mut reader = FrameReader::new(recv_stream, MAX_FRAME_LEN, Duration::from_secs(10));
    assert_eq!(reader.next::<ControlFrame>().await?, Some(ControlFrame::Accept));
    // No file of this offer is there yet.
    assert_eq!(
        reader.next::<ControlFrame>().await?,
        Some(ControlFrame::Present { files: Vec::new(), more: false })
    );
    write_frame(&mut send, &ControlFrame::Finish, MAX_FRAME_LEN).await?;
    let mut refused = Vec::new();
    loop {
        match reader.next::<ControlFrame>().await?.expect("a frame") {
            ControlFrame::EntryRefused { path, reason } => refused.push((path, reason)),
            ControlFrame::Summary { files, .. } => {
                assert_eq!(files, 0);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    refused.sort();
    let paths: Vec<_> = refused.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["abs", "d/t", "d/up"]);
    assert!(refused[0].1.contains("absolute"), "{refused:?}");
    assert!(refused[1].1.contains("`..` after a name"), "{refused:?}");
    assert!(refused[2].1.contains("leads outside the receive folder"), "{refused:?}");
    // The safe ones were made; nothing exists outside the receive folder.
    assert_eq!(std::fs::read_link(out.join("d/ok"))?, Path::new("../elsewhere"));
    assert_eq!(std::fs::read_link(out.join("d/s"))?, Path::new(".."));
    for gone in ["d/up", "abs", "d/t"] {
        assert!(std::fs::symlink_metadata(out.join(gone)).is_err(), "{gone}");
    }
    let outside: Vec<_> =
        std::fs::read_dir(base.path())?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    assert_eq!(outside, ["out"]);
    // The receiver said what it refused and why.
    let events = receiver_events(&mut rx).await?;
    let said: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TransferEvent::Refused { direction: Direction::Receiving, path, reason, .. } => {
                Some((path.clone(), reason.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(said.len(), 3, "{said:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e, TransferEvent::ReceiveEnded { refused: 3, finished: true, .. })));
    Ok(())
}

#[tokio::test]
async fn an_existing_symlink_or_linked_part_in_the_receive_folder_is_never_written_through() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let base = tempfile::tempdir()?;
    let out = base.path().join("out");
    std::fs::create_dir(&out)?;
    let victim = base.path().join("victim");
    std::fs::write(&victim, b"precious")?;
    let victim_dir = base.path().join("victim-dir");
    std::fs::create_dir(&victim_dir)?;
    for name in ["f", "g", "h"] {
        qpeer_tests::write_random(&src.path().join(name), 5000, 1)?;
    }
    qpeer_tests::write_random(&src.path().join("dir/x"), 5000, 2)?;
    std::os::unix::fs::symlink(&victim, out.join("f"))?;
    std::os::unix::fs::symlink(&victim, out.join("g.part"))?;
    std::fs::hard_link(&victim, out.join("h.part"))?;
    std::os::unix::fs::symlink(&victim_dir, out.join("dir"))?;

    let sender = node(&tracker).await?;
    let (recv, _rx, _task) = receiver(&tracker, &out).await?;
    let names = ["f", "g", "h"].map(|n| src.path().join(n)).to_vec();
    let (result, _) = send_paths(&sender, recv.id(), names).await?;
    match result {
        Err(TransferError::FilesFailed { mut failures, .. }) => {
            failures.sort();
            assert_eq!(failures.len(), 2, "{failures:?}");
            assert!(failures[0].0 == "f" && failures[0].1.contains("not a regular file"), "{failures:?}");
            assert!(failures[1].0 == "g" && failures[1].1.contains("not a regular file"), "{failures:?}");
        }
        other => panic!("expected f and g refused, got {other:?}"),
    }
    // h's .part was a second name of the victim: started over in a file of its own.
    qpeer_tests::assert_same_tree(&src.path().join("h"), &out.join("h"))?;
    assert_eq!(std::fs::read(&victim)?, b"precious");
    assert_eq!(std::fs::metadata(&victim)?.nlink(), 1);

    let (result, _) = send_paths(&sender, recv.id(), vec![src.path().join("dir")]).await?;
    match result {
        Err(TransferError::Rejected(reason)) => assert!(reason.contains("not a directory"), "{reason}"),
        other => panic!("expected the offer refused, got {other:?}"),
    }
    assert!(
        std::fs::read_dir(&victim_dir)?.next().is_none(),
        "nothing is written through a linked directory"
    );
    Ok(())
}

#[tokio::test]
async fn a_resume_counts_only_bytes_sent_now_and_a_file_already_there_is_reported_as_such() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let (size, kept, there): (u64, u64, u64) = (8 << 20, 3 << 20, 2 << 20);
    let resumed = src.path().join("resumed.bin");
    qpeer_tests::write_random(&resumed, size as usize, 21)?;
    let data = std::fs::read(&resumed)?;
    std::fs::write(out.path().join("resumed.bin.part"), &data[..kept as usize])?;
    let present = src.path().join("present.bin");
    qpeer_tests::write_random(&present, there as usize, 22)?;
    std::fs::copy(&present, out.path().join("present.bin"))?;

    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, out.path()).await?;
    let (report, events) = send_paths(&sender, recv.id(), vec![resumed.clone(), present.clone()]).await?;
    let report = report?;
    assert_eq!(report.sent_bytes, size - kept, "only the missing bytes are sent");
    assert_eq!((report.resumed, report.resumed_bytes), (1, kept));
    assert_eq!((report.already_there, report.already_there_bytes), (1, there));
    let rate = report.rate() * report.elapsed.as_secs_f64();
    assert!((rate - (size - kept) as f64).abs() < 1.0, "the rate counts bytes sent now");
    let sent: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TransferEvent::FileSent { path, resumed_from, sent_now, already_there, .. } => {
                Some((path.as_str(), *resumed_from, *sent_now, *already_there))
            }
            _ => None,
        })
        .collect();
    assert!(sent.contains(&("resumed.bin", kept, size - kept, false)), "{sent:?}");
    assert!(sent.contains(&("present.bin", 0, 0, true)), "{sent:?}");
    let last = *progress(&events).last().expect("progress");
    assert_eq!(
        (last.done, last.total, last.already, last.sent_now),
        (size + there, size + there, kept + there, size - kept)
    );
    assert_eq!((last.files_done, last.files), (2, 2));

    let received = receiver_events(&mut rx).await?;
    let last = *progress(&received).last().expect("progress");
    assert_eq!((last.done, last.already, last.sent_now), (size + there, kept + there, size - kept));
    assert_eq!((last.files_done, last.files), (2, 2));
    assert!(received.iter().any(|e| matches!(
        e,
        TransferEvent::Received { already_here: true, size, .. } if *size == there
    )));
    match received.last() {
        Some(TransferEvent::ReceiveEnded {
            files, bytes, received_now, already, elapsed, finished, ..
        }) => {
            assert_eq!(
                (*files, *bytes, *received_now, *already),
                (2, size + there, size - kept, kept + there)
            );
            assert!(*finished && *elapsed > Duration::ZERO);
        }
        other => panic!("expected the end, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn after_a_hash_mismatch_retry_progress_never_passes_the_total() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let file = src.path().join("data.bin");
    let size: u64 = 4 << 20;
    qpeer_tests::write_random(&file, size as usize, 5)?;
    qpeer_tests::write_random(&out.path().join("data.bin.part"), 1 << 20, 99)?;
    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, out.path()).await?;
    let (report, events) = send_paths(&sender, recv.id(), vec![file.clone()]).await?;
    let report = report?;
    assert_eq!(report.retried, 1);
    assert_eq!(report.sent_bytes, (size - (1 << 20)) + size);
    assert!(events.iter().any(|e| matches!(e, TransferEvent::Retry { .. })));
    let received = receiver_events(&mut rx).await?;
    for (side, events) in [("sender", &events), ("receiver", &received)] {
        let all = progress(events);
        for p in &all {
            assert!(p.done <= p.total && p.already <= p.done, "{side}: {p:?}");
            for f in &p.active {
                assert!(f.done <= f.size, "{side}: {f:?}");
            }
        }
        let last = all.last().expect("progress");
        assert_eq!(last.done, size, "{side}");
        assert_eq!(last.already, 0, "{side}: the discarded .part is not counted as there");
        assert_eq!(last.sent_now, report.sent_bytes, "{side}: the rate counts what was carried");
        assert_eq!((last.files_done, last.files), (1, 1), "{side}");
    }
    qpeer_tests::assert_same_tree(&file, &out.path().join("data.bin"))?;
    Ok(())
}

#[tokio::test]
async fn a_refused_file_tells_the_sender_why_and_the_receiver_says_so() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    qpeer_tests::write_random(&src.path().join("f"), 1000, 7)?;
    qpeer_tests::write_random(&src.path().join("ok"), 1000, 8)?;
    std::fs::write(out.path().join("f"), b"precious")?;
    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, out.path()).await?;
    let (result, events) =
        send_paths(&sender, recv.id(), vec![src.path().join("f"), src.path().join("ok")]).await?;
    match result {
        Err(TransferError::FilesFailed { total: 2, failures }) => {
            assert_eq!(failures.len(), 1);
            assert!(
                failures[0].1.starts_with("refused by the receiver: ")
                    && failures[0].1.contains("not overwritten"),
                "{failures:?}"
            );
        }
        other => panic!("expected f refused, got {other:?}"),
    }
    qpeer_tests::assert_same_tree(&src.path().join("ok"), &out.path().join("ok"))?;
    assert!(events.iter().any(|e| matches!(
        e,
        TransferEvent::Refused { direction: Direction::Sending, path, reason, .. }
            if path == "f" && reason.contains("not overwritten")
    )));
    let received = receiver_events(&mut rx).await?;
    assert!(
        received.iter().any(|e| matches!(
            e,
            TransferEvent::Refused { direction: Direction::Receiving, path, reason, .. }
                if path == "f" && reason.contains("not overwritten")
        )),
        "{received:?}"
    );
    assert_eq!(std::fs::read(out.path().join("f"))?, b"precious");
    Ok(())
}

#[tokio::test]
async fn out_naming_a_file_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x")?;
    let config =
        |out: PathBuf| ReceiveConfig { out: Some(out), policy: AcceptPolicy::Any, events: Events::new() };
    for out in [file.clone(), file.join("below")] {
        match config(out.clone()).validate() {
            Err(e @ ReceiveConfigError::NotADirectory(_)) => {
                let text = e.to_string();
                assert!(text.contains("a-file") && text.contains("is not a directory"), "{text}");
            }
            other => panic!("{}: expected NotADirectory, got {other:?}", out.display()),
        }
        assert!(config(out).prepare().is_err());
    }
    let fresh = dir.path().join("new/inbox");
    config(fresh.clone()).validate()?;
    assert!(!fresh.exists(), "validate changes nothing");
    config(fresh.clone()).prepare()?;
    assert!(fresh.is_dir());

    // A listener whose folder became a file refuses offers and says why.
    let tracker = TestTracker::start()?;
    let sender = node(&tracker).await?;
    let (recv, _rx, _task) = receiver(&tracker, &file).await?;
    qpeer_tests::write_random(&dir.path().join("f"), 10, 1)?;
    let (result, _) = send_paths(&sender, recv.id(), vec![dir.path().join("f")]).await?;
    match result {
        Err(TransferError::Rejected(reason)) => assert!(reason.contains("is not a directory"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn small_files_go_inline_in_batches_and_what_is_there_is_not_sent_again() -> Result<()> {
    let tracker = TestTracker::start()?;
    let src = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let tree = src.path().join("tree");
    // More than one batch of small files, a large file between them, and one exactly at the
    // inline limit.
    let mut total = 0u64;
    for n in 0..700usize {
        let path = tree.join(format!("d{}", n % 3)).join(format!("f{n}"));
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        let size = 1 + (n * 37) % 8192;
        qpeer_tests::write_random(&path, size, n as u64)?;
        total += size as u64;
    }
    qpeer_tests::write_random(&tree.join("d1/large"), 300_000, 7)?;
    qpeer_tests::write_random(&tree.join("d2/limit"), INLINE_MAX as usize, 8)?;
    total += 300_000 + INLINE_MAX;
    set_mode(&tree.join("d0/f3"), 0o640)?;
    set_mtime(&tree.join("d0/f3"), at(1_100_000_000, 1))?;

    let sender = node(&tracker).await?;
    let (recv, mut rx, _task) = receiver(&tracker, out.path()).await?;
    let (report, _) = send_paths(&sender, recv.id(), vec![tree.clone()]).await?;
    let report = report?;
    assert_eq!((report.files, report.total_bytes, report.sent_bytes), (702, total, total));
    receiver_events(&mut rx).await?;
    let got = out.path().join("tree");
    qpeer_tests::assert_same_tree(&tree, &got)?;
    assert_eq!(mode(&got.join("d0/f3"))?, 0o640);
    assert_eq!(mtime(&got.join("d0/f3"))?, at(1_100_000_000, 1));
    let parts = walk_files(&got)?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "part")).count();
    assert_eq!(parts, 0, "no .part left");

    // Sent again: everything is there, nothing is sent.
    let (again, _) = send_paths(&sender, recv.id(), vec![tree.clone()]).await?;
    let again = again?;
    assert_eq!((again.sent_bytes, again.already_there), (0, 702));
    receiver_events(&mut rx).await?;

    // Some removed, one with the first 20 bytes left in its .part: those are sent (that one
    // resumed), the rest not.
    let mut removed = 0u64;
    for n in [0usize, 1, 2, 350, 699] {
        let rel = format!("d{}/f{n}", n % 3);
        removed += std::fs::metadata(got.join(&rel))?.len();
        std::fs::remove_file(got.join(&rel))?;
    }
    std::fs::write(got.join("d2/f2.part"), &std::fs::read(tree.join("d2/f2"))?[..20])?;
    let (third, _) = send_paths(&sender, recv.id(), vec![tree.clone()]).await?;
    let third = third?;
    assert_eq!((third.sent_bytes, third.already_there, third.resumed), (removed - 20, 697, 1));
    receiver_events(&mut rx).await?;
    qpeer_tests::assert_same_tree(&tree, &got)?;
    Ok(())
}

fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(walk_files(&path)?);
        } else {
            found.push(path);
        }
    }
    Ok(found)
}

#[tokio::test]
async fn inline_batches_outside_the_offer_or_with_a_wrong_hash_are_refused() -> Result<()> {
    let tracker = TestTracker::start()?;
    let out = tempfile::tempdir()?;
    let sender = node(&tracker).await?;
    let (recv, _rx, _task) = receiver(&tracker, out.path()).await?;
    let conn = sender.connect(recv.id()).await?;
    let (mut control, control_recv) = conn.open_stream(StreamKind::Transfer).await?;
    let file = |path: &str, size| OfferEntry {
        path: path.into(),
        kind: EntryKind::File { size },
        meta: Default::default(),
    };
    let transfer_id = [4; 16];
    let offer =
        ControlFrame::Offer { version: TRANSFER_VERSION, transfer_id, entries: 2, total_bytes: 100_010 };
    write_frame(&mut control, &offer, MAX_FRAME_LEN).await?;
    write_frame(
        &mut control,
        &ControlFrame::Entries(vec![file("small", 10), file("big", 100_000)]),
        MAX_FRAME_LEN,
    )
    .await?;
    write_frame(&mut control, &ControlFrame::OfferEnd, MAX_FRAME_LEN).await?;
    let mut replies = FrameReader::new(control_recv, MAX_FRAME_LEN, Duration::from_secs(10));
    assert_eq!(replies.next::<ControlFrame>().await?, Some(ControlFrame::Accept));
    assert!(matches!(replies.next::<ControlFrame>().await?, Some(ControlFrame::Present { more: false, .. })));

    // (first index, files): past the offer's end, a file above the inline limit, both.
    for (index, inline) in [(0u32, 5u32), (1, 1), (0, 2), (u32::MAX, 2)] {
        let (mut send, recv_stream) = conn.open_stream(StreamKind::FileData).await?;
        write_frame(&mut send, &FileHeader { transfer_id, index, inline }, MAX_FRAME_LEN).await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv_stream, MAX_FRAME_LEN, Duration::from_secs(10));
        match reader.next::<FileReply>().await? {
            Some(FileReply::Refused { reason }) => {
                ensure!(reason.contains("batch"), "index {index}, {inline} files: {reason}")
            }
            other => panic!("index {index}, {inline} files: expected a refusal, got {other:?}"),
        }
    }
    // The right bytes under a wrong hash: not stored.
    let (mut send, recv_stream) = conn.open_stream(StreamKind::FileData).await?;
    write_frame(&mut send, &FileHeader { transfer_id, index: 0, inline: 1 }, MAX_FRAME_LEN).await?;
    send.write_all(b"0123456789").await?;
    write_frame(&mut send, &FileEnd { blake3: [0; 32] }, MAX_FRAME_LEN).await?;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv_stream, MAX_FRAME_LEN, Duration::from_secs(10));
    assert_eq!(reader.next::<FileReply>().await?, Some(FileReply::HashMismatch));
    assert!(std::fs::symlink_metadata(out.path().join("small")).is_err());
    // Then with its hash: stored.
    let (mut send, recv_stream) = conn.open_stream(StreamKind::FileData).await?;
    write_frame(&mut send, &FileHeader { transfer_id, index: 0, inline: 1 }, MAX_FRAME_LEN).await?;
    send.write_all(b"0123456789").await?;
    let blake3 = *blake3::hash(b"0123456789").as_bytes();
    write_frame(&mut send, &FileEnd { blake3 }, MAX_FRAME_LEN).await?;
    let _ = send.finish();
    let mut reader = FrameReader::new(recv_stream, MAX_FRAME_LEN, Duration::from_secs(10));
    assert_eq!(reader.next::<FileReply>().await?, Some(FileReply::Verified { blake3 }));
    assert_eq!(std::fs::read(out.path().join("small"))?, b"0123456789");
    Ok(())
}
