//! One actor per peer: it owns the peer's session — its QUIC connection, the handshake in
//! progress, who waits for it, and the work that keeps its path good — and takes commands
//! through its inbox. Every slow step (a tracker request, a handshake, a liveness check) runs
//! in a task the actor owns and reports back to the inbox, so the actor never blocks.
//!
//! Roles: the node with the lower NodeId opens the QUIC connection; the other asks the
//! tracker for an introduction (which reaches the dialer at the same moment) and waits for it.
//! Both probe each other's candidates and both ask for a relay link, so the connection starts
//! at once over whichever path is ready first (see [`crate::paths`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use qpeer_certs::NodeId;
use qpeer_tracker::client::Introduction;
use qpeer_wire::close_code;
use qpeer_wire::tracker::Mapping;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::candidates::dial_targets;
use crate::error::{HandshakeError, NodeError, Unreachable};
use crate::events::NodeEvent;
use crate::paths::PeerPath;
use crate::peer::PeerConnection;
use crate::shared::Shared;
use crate::visits::{self, Visit};

/// Inbox depth of a peer actor.
const INBOX: usize = 64;
/// How long a session without a connection or anyone waiting lives on (a peer that comes back
/// within this finds its session, paths and relay link still there).
const LINGER: Duration = Duration::from_secs(15);
/// A live connection from which neither a ping's echo nor any ACK arrives within this is
/// taken for dead when the peer asks to meet us again. Long enough to span a path switch
/// (the path layer's probes find the next path within about 1.5 s); a peer that really
/// dropped the connection answers its packets with a stateless reset, which ends it sooner.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(3);
/// While relayed, the actor asks the tracker for fresh candidates this often at first, then
/// backing off to [`REFRESH_CAP`]; it looks at its path every [`REFRESH_START`].
const REFRESH_START: Duration = Duration::from_secs(2);
const REFRESH_CAP: Duration = Duration::from_secs(30);
/// A live connection is handed out at once when the peer was heard from this recently;
/// otherwise the tracker is asked first whether the peer is still the same process.
const FRESH: Duration = Duration::from_secs(1);
/// A failed handshake is tried again after this (while callers wait).
const REDIAL_AFTER: Duration = Duration::from_millis(250);

/// What a peer actor is asked to do, or told.
pub(crate) enum Command {
    /// A caller wants a connection.
    Connect(oneshot::Sender<Result<PeerConnection, NodeError>>),
    /// A tracker introduced the peer (asked by us or by the peer): our home (`None`), or the
    /// peer's home that we visit.
    Introduced(Introduction, Option<Arc<Visit>>),
    /// Our home does not know the peer: its home record is being looked up (the connect
    /// timeout starts again once it is found).
    Locating,
    /// Our introduction request failed.
    IntroduceFailed(NodeError),
    /// The peer started a handshake to our session address.
    Incoming(Box<quinn::Incoming>),
    /// A handshake finished.
    Established(quinn::Connection),
    HandshakeFailed(HandshakeError),
    /// The connection with this stable id closed.
    Closed(usize, quinn::ConnectionError),
    /// The result of checking a live connection.
    Alive(usize, bool),
    /// Our tracker connection or address changed: tell the peer where we are now.
    Refresh,
}

/// The part of a session the rest of the node reads without asking the actor.
#[derive(Default)]
pub(crate) struct SessionState {
    pub(crate) connection: Mutex<Option<PeerConnection>>,
}

/// The registry's handle on a running actor.
#[derive(Clone)]
pub(crate) struct SessionHandle {
    pub(crate) inbox: mpsc::Sender<Command>,
    pub(crate) state: Arc<SessionState>,
}

impl SessionHandle {
    pub(crate) fn live_connection(&self) -> Option<PeerConnection> {
        self.state.connection.lock().clone().filter(PeerConnection::is_open)
    }
}

pub(crate) struct PeerActor {
    shared: Arc<Shared>,
    peer: NodeId,
    virtual_addr: SocketAddr,
    inbox_tx: mpsc::Sender<Command>,
    state: Arc<SessionState>,
    conn: Option<PeerConnection>,
    waiters: Vec<oneshot::Sender<Result<PeerConnection, NodeError>>>,
    /// When waiting callers give up.
    deadline: Option<Instant>,
    introducing: bool,
    /// The connect deadline is suspended while the peer's home record is looked up.
    locating: bool,
    /// The peer lives on another tracker, which we visit (`None`: our home).
    via: Option<Arc<Visit>>,
    handshaking: bool,
    last_error: Option<HandshakeError>,
    peer_incarnation: Option<u64>,
    /// Next time to ask the tracker for fresh candidates while relayed, and the gap after it.
    next_refresh: Option<Instant>,
    refresh_gap: Duration,
    /// When to look at the live connection's path again.
    next_check: Option<Instant>,
    /// When to try a failed handshake again.
    redial_at: Option<Instant>,
    /// Last time the session had something to do (it ends [`LINGER`] after).
    idle_since: Instant,
}

impl PeerActor {
    /// Starts the actor for `peer` and returns its handle.
    pub(crate) fn spawn(shared: Arc<Shared>, peer: NodeId) -> SessionHandle {
        let (inbox_tx, inbox) = mpsc::channel(INBOX);
        let state = Arc::new(SessionState::default());
        let virtual_addr = shared.table.lock().open(peer, std::time::Instant::now());
        let actor = PeerActor {
            shared: shared.clone(),
            peer,
            virtual_addr,
            inbox_tx: inbox_tx.clone(),
            state: state.clone(),
            conn: None,
            waiters: Vec::new(),
            deadline: None,
            introducing: false,
            locating: false,
            via: None,
            handshaking: false,
            last_error: None,
            peer_incarnation: None,
            next_refresh: None,
            refresh_gap: REFRESH_START,
            next_check: None,
            redial_at: None,
            idle_since: Instant::now(),
        };
        shared.tasks.spawn(actor.run(inbox));
        SessionHandle { inbox: inbox_tx, state }
    }

    fn we_dial(&self) -> bool {
        self.shared.id() < self.peer
    }

    async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let cancel = self.shared.cancel.clone();
        loop {
            let wake = self.next_wake();
            tokio::select! {
                _ = cancel.cancelled() => break,
                command = inbox.recv() => match command {
                    Some(command) => {
                        self.handle(command);
                        if !self.is_idle() {
                            self.idle_since = Instant::now();
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(wake) => {
                    if self.on_timer() && self.shared.sessions.retire(&self.shared, &self.peer, &self.inbox_tx) {
                        // Out of the registry and the path table first; what raced in goes to
                        // the session that takes this one's place.
                        inbox.close();
                        let raced: Vec<Command> = std::iter::from_fn(|| inbox.try_recv().ok()).collect();
                        if !raced.is_empty() {
                            let successor = self.shared.sessions.session(&self.shared, self.peer);
                            for command in raced {
                                let _ = successor.inbox.try_send(command);
                            }
                        }
                        return;
                    }
                }
            }
        }
        self.fail_waiters(NodeError::Shutdown);
        // On shutdown the session stays in the table: the node closes its connections after
        // its tasks end, and those close packets still need their path.
        if !cancel.is_cancelled() {
            self.shared.table.lock().close(&self.peer);
        }
    }

    fn is_idle(&self) -> bool {
        self.conn.is_none() && self.waiters.is_empty() && !self.handshaking && !self.introducing
    }

    /// The next deadline: waiting callers give up, a refresh is due, or an idle session ends.
    fn next_wake(&self) -> Instant {
        let linger = self.is_idle().then_some(self.idle_since + LINGER);
        [self.deadline, self.next_refresh, self.next_check, self.redial_at, linger]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + LINGER)
    }

    /// Handles deadlines; true when the session is idle and may end.
    fn on_timer(&mut self) -> bool {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            match self.conn.as_ref().filter(|c| c.is_open()).cloned() {
                // The tracker did not say in time whether the peer restarted (it may be
                // down): the connection we hold is the best there is.
                Some(conn) => self.hand_out(&conn),
                None => {
                    let reason = self.unreachable_reason();
                    let timeout = self.shared.connect_timeout;
                    let peer = self.peer;
                    self.fail_waiters_with(|| NodeError::Unreachable {
                        peer,
                        timeout,
                        reason: reason.clone(),
                    });
                }
            }
        }
        if self.redial_at.is_some_and(|t| now >= t) {
            self.redial_at = None;
            if !self.waiters.is_empty() && self.conn.is_none() && self.we_dial() {
                self.dial();
            }
        }
        if self.next_check.is_some_and(|t| now >= t) {
            self.next_check = None;
            if self.conn.is_some() {
                self.next_check = Some(now + REFRESH_START);
                if self.is_direct() {
                    self.next_refresh = None;
                    self.refresh_gap = REFRESH_START;
                } else if self.next_refresh.is_none() && self.shared.table.lock().policy().direct {
                    // Relayed (from the start, or since the direct path went quiet).
                    self.next_refresh = Some(now);
                }
            }
        }
        if self.next_refresh.is_some_and(|t| now >= t) {
            self.next_refresh = None;
            if self.conn.is_some() && !self.is_direct() {
                self.introduce();
                self.next_refresh = Some(now + self.refresh_gap);
                self.refresh_gap = (self.refresh_gap * 2).min(REFRESH_CAP);
            }
        }
        self.is_idle() && now >= self.idle_since + LINGER
    }

    fn unreachable_reason(&self) -> Unreachable {
        let policy = self.shared.table.lock().policy();
        let detail = match (&self.last_error, policy.direct, policy.relay) {
            (Some(error), _, _) => Unreachable::Handshake(error.clone()),
            (None, true, false) => Unreachable::NoDirectPathNoRelay,
            (None, _, _) => Unreachable::NoPath,
        };
        if self.we_dial() {
            detail
        } else {
            Unreachable::PeerNeverDialed(Box::new(detail))
        }
    }

    fn is_direct(&self) -> bool {
        matches!(self.shared.table.lock().path_of(&self.peer), Some((PeerPath::Direct(_), _)))
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Connect(reply) => self.on_connect(reply),
            Command::Introduced(intro, via) => {
                self.restart_deadline();
                self.on_introduced(intro, via);
            }
            Command::Locating => {
                // Looking the peer up in the DHT may take a while: that time does not count
                // against the connect timeout, which starts again when the peer is found.
                if self.deadline.is_some() {
                    self.deadline = None;
                    self.locating = true;
                }
            }
            Command::IntroduceFailed(e) => {
                self.locating = false;
                self.introducing = false;
                let live = self.conn.as_ref().filter(|c| c.is_open()).cloned();
                match live {
                    // The tracker could not say whether the peer restarted: use what we have.
                    Some(conn) if !matches!(e, NodeError::PeerNotFound(_)) => self.hand_out(&conn),
                    _ => {
                        self.deadline = None;
                        self.fail_waiters(e);
                    }
                }
            }
            Command::Incoming(incoming) => self.accept(*incoming),
            Command::Established(connection) => self.install(connection),
            Command::HandshakeFailed(e) => {
                self.handshaking = false;
                tracing::debug!(peer = %self.peer.short(), "handshake failed: {e}");
                self.last_error = Some(e);
                if !self.waiters.is_empty() && self.conn.is_none() && self.we_dial() {
                    self.redial_at = Some(Instant::now() + REDIAL_AFTER);
                }
            }
            Command::Closed(id, reason) => self.on_closed(id, &reason),
            Command::Alive(id, alive) => {
                let current = self.conn.as_ref().is_some_and(|c| c.connection().stable_id() == id);
                if current && !alive {
                    tracing::debug!(peer = %self.peer.short(), "the connection did not answer; dialing anew");
                    self.dial();
                }
            }
            Command::Refresh => {
                if self.conn.is_some() || !self.waiters.is_empty() {
                    self.introduce();
                }
            }
        }
    }

    fn on_connect(&mut self, reply: oneshot::Sender<Result<PeerConnection, NodeError>>) {
        if let Some(conn) = self.conn.as_ref().filter(|c| c.is_open()) {
            let heard = self.shared.table.lock().heard_within(&self.peer, FRESH, std::time::Instant::now());
            if heard {
                let _ = reply.send(Ok(conn.clone()));
                return;
            }
            // Quiet for a while: the peer may be a new process by now, and this connection
            // half-open. The introduction's incarnation tells.
        }
        self.waiters.push(reply);
        if self.deadline.is_none() {
            self.deadline = Instant::now().checked_add(self.shared.connect_timeout);
        }
        self.last_error = None;
        self.introduce();
    }

    /// Asks the tracker to introduce us (both sides learn each other's addresses now).
    fn introduce(&mut self) {
        if self.introducing {
            return;
        }
        self.introducing = true;
        let (shared, peer, inbox) = (self.shared.clone(), self.peer, self.inbox_tx.clone());
        let via = self.via.clone();
        self.shared.tasks.spawn(async move {
            let locating = inbox.clone();
            let result = visits::introduce(&shared, peer, via, move || {
                let _ = locating.try_send(Command::Locating);
            });
            let command = tokio::select! {
                result = result => match result {
                    Ok((intro, via)) => Command::Introduced(intro, via),
                    Err(e) => Command::IntroduceFailed(e),
                },
                _ = shared.cancel.cancelled() => return,
            };
            let _ = inbox.send(command).await;
        });
    }

    /// After a lookup suspended the connect deadline: waiting callers get a full timeout from now.
    fn restart_deadline(&mut self) {
        if std::mem::take(&mut self.locating) && !self.waiters.is_empty() {
            self.deadline = Instant::now().checked_add(self.shared.connect_timeout);
        }
    }

    fn on_introduced(&mut self, intro: Introduction, via: Option<Arc<Visit>>) {
        if intro.requested {
            self.introducing = false;
        }
        // Where we last asked for the peer is where to ask next. An introduction we did not
        // ask for does not move the session: a visited tracker is trusted for the peers we
        // went there for, and cannot pull a session away from home.
        if intro.requested {
            self.via = via;
        }
        let restarted = self.peer_incarnation.is_some_and(|known| known != intro.incarnation);
        {
            let mut table = self.shared.table.lock();
            if restarted {
                // The old process's paths are dead: waiting for them to go quiet would hold
                // up the new connection's handshake.
                table.forget_direct(&self.peer);
            }
            let mut targets = dial_targets(&intro.addrs);
            if intro.mapping == Mapping::EndpointDependent
                && self.shared.tracker.mapping() == Mapping::EndpointDependent
            {
                // Both NATs map per destination: the address the tracker saw the peer at is
                // not the one it would use toward us, and ours is not what it would reach,
                // so a punch toward the public address cannot work. Skip it and let the
                // relay carry the session; addresses on a shared LAN still get probed.
                targets.retain(|addr| *addr != intro.addrs.observed);
            }
            table.add_candidates(&self.peer, &targets, std::time::Instant::now());
        }
        // Probe now, not at the next tick: the peer probes us at this very moment.
        self.shared.prober.tick();
        self.shared.ask_for_relay(self.peer, self.via.clone());
        self.peer_incarnation = Some(intro.incarnation);
        let live = self.conn.as_ref().filter(|c| c.is_open()).cloned();
        if restarted {
            if let Some(old) = &live {
                // The peer is a new process: the old connection is half-open at best.
                old.close(close_code::PEER_REPLACED, "the peer restarted");
            }
        }
        if let Some(conn) = live.as_ref().filter(|_| !restarted && intro.requested) {
            // The same process as before: the connection we hold is the one.
            self.hand_out(conn);
        }
        if !self.we_dial() || self.handshaking {
            return;
        }
        match live {
            Some(conn) if !restarted => {
                // The peer asked to meet us although we hold a connection: it may have lost
                // its side. Check ours answers; dial anew if not.
                if !intro.requested {
                    self.check_alive(conn);
                }
            }
            _ => {
                if !self.waiters.is_empty() || !intro.requested || restarted {
                    self.dial();
                }
            }
        }
    }

    fn check_alive(&self, conn: PeerConnection) {
        let inbox = self.inbox_tx.clone();
        self.shared.tasks.spawn(async move {
            // An ACK from the peer proves it holds the connection as well as an echo does:
            // while a path moves or a bulk send recovers from loss the echo can be late, and
            // a new connection would replace (and end) one that is working.
            let acks = conn.connection().stats().frame_rx.acks;
            let answered = matches!(tokio::time::timeout(LIVENESS_TIMEOUT, conn.ping(0)).await, Ok(Ok(_)));
            let alive = answered || conn.connection().stats().frame_rx.acks > acks;
            let _ = inbox.send(Command::Alive(conn.connection().stable_id(), alive)).await;
        });
    }

    /// Opens the QUIC connection to the session's virtual address: its packets leave on
    /// whichever path is ready first.
    fn dial(&mut self) {
        if self.handshaking {
            return;
        }
        let config = match self.shared.peer_client_config(self.peer) {
            Ok(config) => config,
            Err(e) => {
                self.last_error = Some(HandshakeError::Config(Arc::new(e)));
                return;
            }
        };
        let connecting = self.shared.endpoint.connect_with(
            config,
            self.virtual_addr,
            qpeer_certs::config::PINNED_SERVER_NAME,
        );
        let connecting = match connecting {
            Ok(connecting) => connecting,
            Err(e) => {
                self.last_error = Some(HandshakeError::Start(e));
                return;
            }
        };
        self.handshaking = true;
        let (inbox, timeout) = (self.inbox_tx.clone(), self.shared.connect_timeout);
        self.shared.tasks.spawn(async move {
            let command = match tokio::time::timeout(timeout, connecting).await {
                Ok(Ok(connection)) => Command::Established(connection),
                Ok(Err(e)) => Command::HandshakeFailed(HandshakeError::Failed(e)),
                Err(_) => Command::HandshakeFailed(HandshakeError::TimedOut(timeout)),
            };
            let _ = inbox.send(command).await;
        });
    }

    /// The peer's handshake to our session address: accepted if it really is the peer.
    fn accept(&mut self, incoming: quinn::Incoming) {
        if self.we_dial() {
            // The peer never dials us (the lower NodeId does): whatever this is, it is not
            // the peer's handshake, and it must not disturb ours.
            incoming.refuse();
            return;
        }
        let connecting = match incoming.accept_with(self.shared.transport.server.clone()) {
            Ok(connecting) => connecting,
            Err(e) => {
                tracing::debug!(peer = %self.peer.short(), "incoming handshake refused: {e}");
                return;
            }
        };
        self.handshaking = true;
        let (inbox, peer) = (self.inbox_tx.clone(), self.peer);
        self.shared.tasks.spawn(async move {
            let command = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
                Ok(Ok(connection)) => match qpeer_certs::peer_node_id(&connection) {
                    Ok(id) if id == peer => Command::Established(connection),
                    Ok(other) => {
                        connection.close(
                            close_code::PEER_PROTOCOL_VIOLATION.into(),
                            b"not the node of this session",
                        );
                        Command::HandshakeFailed(HandshakeError::WrongPeer {
                            answered: other,
                            expected: peer,
                        })
                    }
                    Err(e) => {
                        connection
                            .close(close_code::PEER_PROTOCOL_VIOLATION.into(), e.to_string().as_bytes());
                        Command::HandshakeFailed(HandshakeError::PeerIdentity(e))
                    }
                },
                Ok(Err(e)) => Command::HandshakeFailed(HandshakeError::IncomingFailed(e)),
                Err(_) => Command::HandshakeFailed(HandshakeError::IncomingTimedOut),
            };
            let _ = inbox.send(command).await;
        });
    }

    /// Makes `connection` the session's connection.
    fn install(&mut self, connection: quinn::Connection) {
        self.handshaking = false;
        let conn = PeerConnection::new(self.peer, connection.clone(), self.shared.table.clone());
        if let Some(old) = self.conn.replace(conn.clone()) {
            if old.connection().stable_id() != connection.stable_id() {
                old.close(close_code::PEER_REPLACED, "replaced by a newer connection");
            }
        }
        *self.state.connection.lock() = Some(conn.clone());
        self.deadline = None;
        self.last_error = None;
        self.redial_at = None;
        self.next_check = Some(Instant::now() + REFRESH_START);
        self.shared.events.emit(NodeEvent::PeerConnected {
            peer: self.peer,
            path: conn.path(),
            rtt: conn.rtt(),
        });
        self.hand_out(&conn);
        // Every connection is offered to `accept` (a listener serves transfers on it), also
        // when we asked for it: replying to someone who just reached you is ordinary.
        let _ = self.shared.accepted.try_send(conn.clone());
        self.refresh_gap = REFRESH_START;
        let (cancel, connection) = (self.shared.cancel.clone(), connection.clone());
        self.shared.tasks.spawn(async move {
            tokio::select! {
                () = crate::window::tune_receive_window(connection) => {}
                () = cancel.cancelled() => {}
            }
        });
        let (shared, inbox) = (self.shared.clone(), self.inbox_tx.clone());
        self.shared.tasks.spawn(async move {
            let id = conn.connection().stable_id();
            let reason = tokio::select! {
                reason = crate::streams::serve_streams(shared.clone(), conn) => reason,
                _ = shared.cancel.cancelled() => return,
            };
            let _ = inbox.send(Command::Closed(id, reason)).await;
        });
    }

    fn on_closed(&mut self, id: usize, reason: &quinn::ConnectionError) {
        let current = self.conn.as_ref().is_some_and(|c| c.connection().stable_id() == id);
        if !current {
            return;
        }
        self.conn = None;
        *self.state.connection.lock() = None;
        self.next_refresh = None;
        self.next_check = None;
        self.idle_since = Instant::now();
        self.shared.events.emit(NodeEvent::PeerDisconnected { peer: self.peer, reason: reason.clone() });
    }

    /// Gives `conn` to every waiting caller.
    fn hand_out(&mut self, conn: &PeerConnection) {
        self.deadline = None;
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Ok(conn.clone()));
        }
    }

    /// Fails every waiting caller with `error` (shared when there are several).
    fn fail_waiters(&mut self, error: NodeError) {
        if self.waiters.len() <= 1 {
            let mut error = Some(error);
            self.fail_waiters_with(|| error.take().unwrap_or(NodeError::Shutdown));
        } else {
            let error = Arc::new(error);
            self.fail_waiters_with(|| NodeError::Shared(error.clone()));
        }
    }

    fn fail_waiters_with(&mut self, mut error: impl FnMut() -> NodeError) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(error()));
        }
        self.idle_since = Instant::now();
    }
}
