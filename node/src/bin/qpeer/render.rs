//! The console: a node's events as the lines users and tests read, and a command's own
//! output, in the order they happened.
//!
//! Events arrive on a broadcast channel, a command's lines are printed by the command itself.
//! [`Console::line`] first renders every event still waiting (each was emitted before the
//! command got to its line, so it is already in the channel), then the line; a task renders
//! events while no command prints. Both take one lock, so nothing overtakes anything.
//! [`Console::flush`] before exiting renders what is left.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_node::transfer::{Direction, TransferEvent};
use qpeer_node::{Events, NodeEvent, RecordState};

use crate::progress::{human_bytes, human_duration, human_rate, ProgressView};
use qpeer_node::transfer::rate;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;

/// Where a console's lines and progress end up: this process's terminal, or the client of a
/// control-socket command.
pub trait Sink: Send + 'static {
    fn line(&mut self, text: &str);
    /// How far the transfer called `label` has come.
    fn progress(&mut self, label: &str, view: &ProgressView);
    /// The transfer called `label` ended.
    fn finish(&mut self, label: &str);
}

/// What a command prints to (see [`Console`]), and where the transfers it runs report.
pub trait Output: Send + Sync {
    fn line(&self, text: &str);
    fn events(&self) -> &Events;
}

struct Screen<S> {
    events: Receiver<NodeEvent>,
    sink: S,
    /// Names of peers for progress labels (the demo's "bob"); others go by their short id.
    names: HashMap<NodeId, String>,
}

/// Renders the events of one channel and a command's lines to a [`Sink`], in order.
pub struct Console<S: Sink> {
    events: Events,
    /// Render event lines (`false`: only progress; `--quiet`, or commands such as `peers`
    /// whose output is the answer alone).
    verbose: bool,
    screen: Mutex<Screen<S>>,
}

impl<S: Sink> Console<S> {
    /// A console of every event on `events` from now on; it renders them as they come
    /// while a Tokio runtime runs.
    pub fn start(events: &Events, sink: S, verbose: bool) -> Arc<Self> {
        let console = Arc::new(Self {
            events: events.clone(),
            verbose,
            screen: Mutex::new(Screen { events: events.subscribe(), sink, names: HashMap::new() }),
        });
        // A second subscription only to wake up: the events themselves are taken from the
        // console's own receiver, under its lock.
        let mut wake = events.subscribe();
        let pump: Weak<Self> = Arc::downgrade(&console);
        tokio::spawn(async move {
            loop {
                match wake.recv().await {
                    Ok(_) | Err(RecvError::Lagged(_)) => match pump.upgrade() {
                        Some(console) => console.flush(),
                        None => return,
                    },
                    Err(RecvError::Closed) => return,
                }
            }
        });
        console
    }

    /// Calls `peer` by `name` in progress labels.
    pub fn name(&self, peer: NodeId, name: &str) {
        self.screen.lock().names.insert(peer, name.to_string());
    }

    /// Renders every event waiting.
    pub fn flush(&self) {
        let mut screen = self.screen.lock();
        self.drain(&mut screen);
    }

    fn drain(&self, screen: &mut Screen<S>) {
        loop {
            match screen.events.try_recv() {
                Ok(event) => self.render(screen, &event),
                Err(TryRecvError::Lagged(missed)) => screen
                    .sink
                    .line(&format!("[WARNING] {missed} events were not shown: the console fell behind")),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    fn render(&self, screen: &mut Screen<S>, event: &NodeEvent) {
        if let NodeEvent::Transfer(transfer) = event {
            match transfer {
                TransferEvent::Progress(progress) => {
                    let label = screen.label(&progress.peer, progress.direction);
                    screen.sink.progress(&label, &ProgressView::of(progress));
                    return;
                }
                TransferEvent::Sent { peer, .. } | TransferEvent::SendFailed { peer, .. } => {
                    let label = screen.label(peer, Direction::Sending);
                    screen.sink.finish(&label);
                    return;
                }
                TransferEvent::ReceiveEnded { peer, .. } => {
                    let label = screen.label(peer, Direction::Receiving);
                    screen.sink.finish(&label);
                }
                _ => {}
            }
        }
        if self.verbose {
            if let Some(line) = event_line(event) {
                screen.sink.line(&line);
            }
        }
    }
}

impl<S: Sink> Output for Console<S> {
    fn line(&self, text: &str) {
        let mut screen = self.screen.lock();
        self.drain(&mut screen);
        screen.sink.line(text);
    }

    fn events(&self) -> &Events {
        &self.events
    }
}

impl<S> Screen<S> {
    /// What a transfer with `peer` is called on screen.
    fn label(&self, peer: &NodeId, direction: Direction) -> String {
        let way = match direction {
            Direction::Sending => "to",
            Direction::Receiving => "from",
        };
        match self.names.get(peer) {
            Some(name) => format!("{way} {name}"),
            None => format!("{way} {}", peer.short()),
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The console line of an event; `None` for events shown otherwise (progress) or not at all.
pub fn event_line(event: &NodeEvent) -> Option<String> {
    Some(match event {
        NodeEvent::TrackerTrusted { tracker, host_port, saved_in } => format!(
            "[TRACKER] trusting {tracker} at {host_port} on first use (saved in {})",
            saved_in.display()
        ),
        NodeEvent::Registered { id, observed } => format!("[REGISTERED] observed {observed} as {id}"),
        NodeEvent::Observed { observed, was } => format!("[OBSERVED] {observed} (was {was})"),
        NodeEvent::Replaced { detail } => {
            format!("[REPLACED] {}", qpeer_node::NodeError::Replaced { detail: detail.clone() })
        }
        NodeEvent::PeerConnected { peer, path, rtt } => {
            format!("[PEER CONNECTED] {peer} {path} rtt {:.1} ms", ms(*rtt))
        }
        NodeEvent::PeerDisconnected { peer, reason } => {
            format!("[PEER DISCONNECTED] {peer} ({})", qpeer_wire::io::describe_close(reason))
        }
        NodeEvent::PathChanged { peer, path, was } => format!("[PATH] {peer} {path} (was {was})"),
        NodeEvent::Transfer(event) => return transfer_line(event),
        NodeEvent::NatChecked(report) => {
            format!(
                "[NETCHECK] mapping {}: {}",
                qpeer_node::netcheck::mapping_name(report.mapping),
                report.verdict()
            )
        }
        NodeEvent::HomeChosen { tracker, host_port, rtt } => match rtt {
            Some(rtt) => {
                format!("[HOME] tracker {} at {host_port} (answered in {:.1} ms)", tracker.short(), ms(*rtt))
            }
            None => format!("[HOME] tracker {} at {host_port}", tracker.short()),
        },
        NodeEvent::RecordChanged(state) => match state {
            RecordState::Published { seq, stored_on } => {
                format!("[RECORD] published seq {seq} on {stored_on} DHT nodes")
            }
            RecordState::Failed { reason } => format!("[RECORD] publish failed ({reason}); retrying"),
            // A tracker that serves alone is the ordinary case: `qpeer status` tells.
            RecordState::NoDht | RecordState::Unpublished => return None,
        },
        NodeEvent::PeerResolved { peer, tracker, addr, seq, took } => format!(
            "[RESOLVED] {} lives on tracker {} at {addr} (seq {seq}, {:.0} ms)",
            peer.short(),
            tracker.short(),
            ms(*took)
        ),
    })
}

fn transfer_line(event: &TransferEvent) -> Option<String> {
    Some(match event {
        TransferEvent::OfferAccepted { peer, files, bytes, into, .. } => format!(
            "[OFFER] from {peer}: {files} files, {bytes} bytes ({}) into {}: accepted",
            human_bytes(*bytes),
            into.display()
        ),
        TransferEvent::Rejected { peer, reason } => format!("[REJECTED] transfer from {peer}: {reason}"),
        TransferEvent::Received { path, size, blake3, already_here, .. } => format!(
            "[RECEIVED] {} {size} bytes blake3={}{}",
            path.display(),
            hex(blake3),
            if *already_here { " (already here)" } else { "" }
        ),
        TransferEvent::Corrupt { path, .. } => format!(
            "[CORRUPT] {}: the received file does not match its BLAKE3 hash; discarded, asking again",
            path.display()
        ),
        TransferEvent::FileFailed { path, reason, .. } => format!("[ERROR] {}: {reason}", path.display()),
        TransferEvent::Retry { path, .. } => {
            format!("[RETRY] {path}: the receiver's copy did not verify; sending it again")
        }
        TransferEvent::Refused { peer, direction: Direction::Receiving, path, reason, .. } => {
            format!("[REFUSED] {path} from {}: {reason}", peer.short())
        }
        TransferEvent::Refused { peer, direction: Direction::Sending, path, reason, .. } => {
            format!("[REFUSED] {path} by {}: {reason}", peer.short())
        }
        TransferEvent::Linked { path, target, already_here, .. } => format!(
            "[LINKED] {} -> {}{}",
            path.display(),
            qpeer_wire::printable(target, 256),
            if *already_here { " (already here)" } else { "" }
        ),
        TransferEvent::Skipped { path, reason, .. } => format!("[SKIPPED] {}: {reason}", path.display()),
        TransferEvent::ReceiveEnded {
            peer,
            files,
            bytes,
            finished,
            elapsed,
            received_now,
            already,
            refused,
            ..
        } => {
            let mut line = if *finished {
                format!(
                    "[DONE] from {}: {files} files, {} verified in {}, {} ({} received now",
                    peer.short(),
                    human_bytes(*bytes),
                    human_duration(*elapsed),
                    human_rate(rate(*received_now, *elapsed)),
                    human_bytes(*received_now),
                )
            } else {
                format!(
                    "[INCOMPLETE] from {}: the sender stopped after {files} files, {} verified in {}, {} ({} \
                     received now; what arrived of the rest is kept for a resume",
                    peer.short(),
                    human_bytes(*bytes),
                    human_duration(*elapsed),
                    human_rate(rate(*received_now, *elapsed)),
                    human_bytes(*received_now),
                )
            };
            if *already > 0 {
                line.push_str(&format!(", {} already here", human_bytes(*already)));
            }
            if *refused > 0 {
                line.push_str(&format!(", {refused} refused or failed"));
            }
            line.push(')');
            line
        }
        TransferEvent::Progress(_)
        | TransferEvent::Sent { .. }
        | TransferEvent::SendFailed { .. }
        | TransferEvent::FileSent { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps what it is given.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Sink for Recorder {
        fn line(&mut self, text: &str) {
            self.0.lock().push(text.to_string());
        }
        fn progress(&mut self, label: &str, view: &ProgressView) {
            self.0.lock().push(format!("progress {label} {}/{}", view.done, view.total));
        }
        fn finish(&mut self, label: &str) {
            self.0.lock().push(format!("finish {label}"));
        }
    }

    fn peer() -> NodeId {
        "ab".repeat(32).parse().expect("a node id")
    }

    fn retry(path: &str) -> NodeEvent {
        NodeEvent::Transfer(TransferEvent::Retry { transfer: [0; 16], peer: peer(), path: path.into() })
    }

    #[tokio::test]
    async fn events_before_a_line_come_before_it_and_none_is_lost() {
        let events = Events::new();
        let recorder = Recorder::default();
        let console = Console::start(&events, recorder.clone(), true);
        for n in 0..100 {
            events.emit(retry(&format!("f{n}")));
        }
        console.line("after");
        events.emit(retry("last"));
        console.flush();
        let lines = recorder.0.lock().clone();
        assert_eq!(lines.len(), 102, "{lines:?}");
        for (n, line) in lines.iter().take(100).enumerate() {
            assert!(line.starts_with(&format!("[RETRY] f{n}: ")), "{line}");
        }
        assert_eq!(lines[100], "after");
        assert!(lines[101].starts_with("[RETRY] last: "), "{}", lines[101]);
    }

    #[tokio::test]
    async fn a_quiet_console_shows_progress_and_no_event_lines() {
        let events = Events::new();
        let recorder = Recorder::default();
        let console = Console::start(&events, recorder.clone(), false);
        events.emit(retry("f"));
        events.emit(NodeEvent::Transfer(TransferEvent::Progress(qpeer_node::transfer::TransferProgress {
            transfer: [0; 16],
            peer: peer(),
            direction: Direction::Sending,
            done: 5,
            total: 10,
            elapsed: std::time::Duration::ZERO,
            already: 0,
            sent_now: 5,
            files_done: 0,
            files: 1,
            active: Vec::new(),
        })));
        console.flush();
        assert_eq!(*recorder.0.lock(), vec![format!("progress to {} 5/10", peer().short())]);
    }

    #[test]
    fn node_events_read_as_before() {
        let id = peer();
        let line = event_line(&NodeEvent::PeerConnected {
            peer: id,
            path: qpeer_node::PeerPath::Relayed,
            rtt: std::time::Duration::from_micros(2300),
        });
        assert_eq!(
            line.as_deref(),
            Some(format!("[PEER CONNECTED] {id} relayed via tracker rtt 2.3 ms").as_str())
        );
    }
}
