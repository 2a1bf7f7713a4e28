//! The transfers a process is running, both ways, with bytes so far, as `qpeer status`
//! shows them: kept from the transfer events of the channels it watches (the listener's own,
//! and each control-socket command's).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_node::transfer::receive::ActiveReceive;
use qpeer_node::transfer::{Direction, TransferEvent};
use qpeer_node::{Events, NodeEvent};
use qpeer_wire::transfer::TransferId;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::progress::{human_bytes, ProgressView};

/// A transfer not heard of for this long is taken as gone (its end event was lost).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// One transfer in flight.
#[derive(Debug, Clone)]
pub struct TransferRow {
    pub transfer: TransferId,
    pub peer: NodeId,
    pub direction: Direction,
    pub view: ProgressView,
    /// Where a received transfer is written.
    pub into: Option<PathBuf>,
    updated: Instant,
}

impl TransferRow {
    fn new(transfer: TransferId, peer: NodeId, direction: Direction) -> Self {
        Self { transfer, peer, direction, view: ProgressView::default(), into: None, updated: Instant::now() }
    }

    /// A transfer the receiver knows of but no progress was seen for.
    pub fn of_receive(active: &ActiveReceive) -> Self {
        let mut row = Self::new(active.transfer, active.peer, Direction::Receiving);
        row.view = ProgressView {
            done: active.verified_bytes,
            total: active.bytes,
            files_done: active.verified_files,
            files: u32::try_from(active.files).unwrap_or(u32::MAX),
            ..ProgressView::default()
        };
        row.into = Some(active.into.clone());
        row
    }

    fn direction_word(&self) -> &'static str {
        match self.direction {
            Direction::Sending => "sending",
            Direction::Receiving => "receiving",
        }
    }

    /// `sending to <id>: 12.0 MiB/60.0 MiB (20%), 3/10 files, 14.2 MiB/s, …`.
    pub fn line(&self) -> String {
        let way = match self.direction {
            Direction::Sending => "to",
            Direction::Receiving => "from",
        };
        let mut line = format!("{} {way} {}: {}", self.direction_word(), self.peer, self.view.line());
        line.push_str(&format!(" ({} of {} bytes)", self.view.done, self.view.total));
        if let Some(into) = &self.into {
            line.push_str(&format!(", into {}", into.display()));
        }
        line
    }

    pub fn json(&self) -> Value {
        json!({
            "direction": self.direction_word(),
            "peer": self.peer.to_string(),
            "transfer": crate::render::hex(&self.transfer),
            "done_bytes": self.view.done,
            "total_bytes": self.view.total,
            "sent_now_bytes": self.view.sent_now,
            "files_done": self.view.files_done,
            "files": self.view.files,
            "elapsed_s": self.view.elapsed.as_secs_f64(),
            "rate_bytes_per_s": self.view.rate(),
            "current": self.view.current.as_ref().map(|(path, done, size)| json!({
                "path": path, "done_bytes": done, "size_bytes": size
            })),
            "into": self.into.as_ref().map(|p| p.display().to_string()),
            "summary": format!("{}/{}", human_bytes(self.view.done), human_bytes(self.view.total)),
        })
    }
}

/// The transfers in flight, by id.
#[derive(Default)]
pub struct Transfers {
    rows: Mutex<HashMap<TransferId, TransferRow>>,
}

impl Transfers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Keeps track of the transfers on `events` from now on, until that channel closes.
    pub fn watch(self: &Arc<Self>, events: &Events) {
        let mut rx = events.subscribe();
        let table = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(event) => match table.upgrade() {
                        Some(table) => table.observe(&event),
                        None => return,
                    },
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    pub fn observe(&self, event: &NodeEvent) {
        let NodeEvent::Transfer(event) = event else { return };
        let mut rows = self.rows.lock();
        match event {
            TransferEvent::OfferAccepted { transfer, peer, files, bytes, into } => {
                let row = rows
                    .entry(*transfer)
                    .or_insert_with(|| TransferRow::new(*transfer, *peer, Direction::Receiving));
                row.into = Some(into.clone());
                row.view.total = *bytes;
                row.view.files = u32::try_from(*files).unwrap_or(u32::MAX);
                row.updated = Instant::now();
            }
            TransferEvent::Progress(progress) => {
                let row = rows.entry(progress.transfer).or_insert_with(|| {
                    TransferRow::new(progress.transfer, progress.peer, progress.direction)
                });
                row.view = ProgressView::of(progress);
                row.updated = Instant::now();
            }
            TransferEvent::Sent { transfer, .. }
            | TransferEvent::SendFailed { transfer, .. }
            | TransferEvent::ReceiveEnded { transfer, .. } => {
                rows.remove(transfer);
            }
            _ => {}
        }
        rows.retain(|_, row| row.updated.elapsed() < FORGET_AFTER);
    }

    /// The transfers in flight, sending first, then by peer.
    pub fn rows(&self) -> Vec<TransferRow> {
        let mut rows: Vec<TransferRow> = self.rows.lock().values().cloned().collect();
        rows.sort_by_key(|r| (r.direction == Direction::Receiving, r.peer.to_string(), r.transfer));
        rows
    }
}
