//! In-process tracker tests: a real tracker on 127.0.0.1:0 and real quinn clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use qpeer_certs::config::PINNED_SERVER_NAME;
use qpeer_certs::{Identity, ServerTrust};
use qpeer_tracker::client::{Introduction, RegisterInfo};
use qpeer_tracker::{ClientError, Limits, Tracker, TrackerClient, TrackerConfig};
use qpeer_tracker::{ServerEvents, TrackerEvent};
use qpeer_wire::close_code;
use qpeer_wire::tracker::{ErrorKind, ALPN};
use tokio::sync::{mpsc, oneshot};

struct RunningTracker {
    stats: qpeer_tracker::server::TrackerStats,
    addr: SocketAddr,
    /// Every listen address, `addr` first.
    addrs: Vec<SocketAddr>,
    id: qpeer_certs::NodeId,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningTracker {
    async fn start(limits: Limits) -> Self {
        Self::start_on(limits, Vec::new()).await
    }

    /// A tracker on 127.0.0.1 and on each of `extra` too.
    async fn start_on(limits: Limits, extra: Vec<SocketAddr>) -> Self {
        let identity = Arc::new(Identity::generate().expect("identity"));
        let mut config = TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), identity);
        config.limits = limits;
        config.extra_listen = extra;
        let tracker = Tracker::bind(config).expect("bind tracker");
        let (stop, stopped) = oneshot::channel::<()>();
        let addr = tracker.local_addr();
        let addrs = tracker.local_addrs();
        let id = tracker.node_id();
        let stats = tracker.stats();
        let task = tokio::spawn(tracker.run(async {
            let _ = stopped.await;
        }));
        Self { stats, addr, addrs, id, stop: Some(stop), task }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).expect("client endpoint")
}

#[allow(dead_code)]
struct TestNode {
    identity: Identity,
    endpoint: quinn::Endpoint,
    client: TrackerClient,
    intros: mpsc::Receiver<TrackerEvent>,
}

impl std::fmt::Debug for TestNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestNode({})", self.identity.node_id())
    }
}

async fn register(tracker: &RunningTracker, identity: Identity) -> Result<TestNode, ClientError> {
    register_at(tracker, tracker.addr, identity).await
}

/// Registers at one of the tracker's addresses.
async fn register_at(
    tracker: &RunningTracker,
    at: SocketAddr,
    identity: Identity,
) -> Result<TestNode, ClientError> {
    let endpoint = endpoint();
    let candidates = vec![endpoint.local_addr().expect("addr")];
    let (client, intros) = TrackerClient::connect(
        &endpoint,
        &identity,
        at,
        PINNED_SERVER_NAME,
        &ServerTrust::Pinned(tracker.id),
        RegisterInfo { candidates, name: Some("test".into()), incarnation: 1, visitor: false },
    )
    .await?;
    Ok(TestNode { identity, endpoint, client, intros })
}

async fn node(tracker: &RunningTracker) -> TestNode {
    register(tracker, Identity::generate().expect("identity")).await.expect("register")
}

/// The application close code of a closed connection.
async fn close_code_of(conn: &quinn::Connection) -> Option<u64> {
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

async fn next_event(node: &mut TestNode) -> TrackerEvent {
    tokio::time::timeout(Duration::from_secs(5), node.intros.recv())
        .await
        .expect("an event within 5 s")
        .expect("the event stream is open")
}

async fn next_introduction(node: &mut TestNode) -> Introduction {
    match next_event(node).await {
        TrackerEvent::Introduction(intro) => intro,
        other => panic!("expected an introduction, got {other:?}"),
    }
}

#[tokio::test]
async fn register_list_and_introduce() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let mut a = node(&tracker).await;
    let mut b = node(&tracker).await;
    assert_eq!(a.client.observed_addr(), a.endpoint.local_addr().expect("addr"));
    assert_eq!(b.client.observed_addr(), b.endpoint.local_addr().expect("addr"));
    assert_eq!(a.client.tracker_id(), Some(tracker.id));

    let mut listed: Vec<_> =
        a.client.list_all().await.expect("list").into_iter().map(|p| p.node_id).collect();
    listed.sort();
    let mut expected = vec![a.identity.node_id(), b.identity.node_id()];
    expected.sort();
    assert_eq!(listed, expected);

    let intro = a.client.introduce(b.identity.node_id()).await.expect("introduce");
    assert_eq!(intro.peer, b.identity.node_id());
    assert_eq!(intro.addrs.observed, b.client.observed_addr());
    assert_eq!(intro.addrs.candidates, vec![b.endpoint.local_addr().expect("addr")]);
    let at_b = next_introduction(&mut b).await;
    assert_eq!(at_b.peer, a.identity.node_id());
    assert!(!at_b.requested);
    assert_eq!(at_b.addrs.observed, a.client.observed_addr());
    assert_eq!(at_b.addrs.candidates, vec![a.endpoint.local_addr().expect("addr")]);
    assert!(a.intros.try_recv().is_err(), "the requester gets its answer as a reply, not an event");

    let unknown = Identity::generate().expect("identity").node_id();
    assert!(matches!(a.client.introduce(unknown).await, Err(ClientError::NotFound(id)) if id == unknown));
    assert!(matches!(
        a.client.introduce(a.identity.node_id()).await,
        Err(ClientError::Refused { kind: ErrorKind::InvalidRequest, .. })
    ));
    tracker.stop().await;
}

#[tokio::test]
async fn listing_pages_through_the_directory() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let mut nodes = Vec::new();
    for _ in 0..5 {
        nodes.push(node(&tracker).await);
    }
    let (first, next) = nodes[0].client.list_page(None, 2).await.expect("page");
    assert_eq!(first.len(), 2);
    let (second, _) = nodes[0].client.list_page(next, 2).await.expect("page");
    assert_eq!(second.len(), 2);
    assert!(first[1].node_id < second[0].node_id, "pages are ordered and do not overlap");
    assert_eq!(nodes[0].client.list_all().await.expect("all").len(), 5);
    tracker.stop().await;
}

#[tokio::test]
async fn same_node_id_replaces_the_older_connection() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let identity = Identity::generate().expect("identity");
    let key = std::env::temp_dir().join(format!("qpeer-replace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&key);
    // Two processes with one identity: load the same key file twice.
    let first_identity = Identity::load_or_create(&key).expect("key");
    let second_identity = Identity::load_or_create(&key).expect("key");
    drop(identity);
    let first = register(&tracker, first_identity).await.expect("first");
    let second = register(&tracker, second_identity).await.expect("second");
    assert_eq!(close_code_of(first.client.connection()).await, Some(close_code::REPLACED.into()));
    let listed = second.client.list_all().await.expect("list");
    assert_eq!(listed.len(), 1);
    let _ = std::fs::remove_dir_all(&key);
    tracker.stop().await;
}

/// A client that presents someone else's certificate but signs with its own key.
mod impostor {
    use std::sync::Arc;

    use rustls::client::ResolvesClientCert;
    use rustls::sign::CertifiedKey;
    use rustls::SignatureScheme;

    #[derive(Debug)]
    pub struct Impostor(pub Arc<CertifiedKey>);

    impl ResolvesClientCert for Impostor {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }
}

#[tokio::test]
async fn a_node_cannot_register_another_nodes_id() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let victim = Identity::generate().expect("victim");
    let attacker = Identity::generate().expect("attacker");
    let provider = Arc::new(qpeer_certs::config::crypto_provider());
    let signing_key = provider.key_provider.load_private_key(attacker.private_key_der()).expect("key");
    let certified =
        rustls::sign::CertifiedKey::new(vec![victim.self_signed_cert().expect("cert")], signing_key);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(qpeer_certs::verify::PinnedServerVerifier::new(
            qpeer_certs::verify::ExpectedPeer::Pinned(tracker.id),
        ))
        .with_client_cert_resolver(Arc::new(impostor::Impostor(Arc::new(certified))));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic");
    let result = endpoint()
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), tracker.addr, PINNED_SERVER_NAME)
        .expect("connect")
        .await;
    // In TLS 1.3 the client finishes before the server checks its certificate, so the refusal
    // arrives as the connection closing with a TLS alert.
    let err = match result {
        Err(err) => err,
        Ok(conn) => tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("the tracker must close the impostor"),
    };
    assert!(
        matches!(
            err,
            quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_)
        ),
        "{err}"
    );
    assert!(err.to_string().contains("error 51"), "decrypt_error alert expected: {err}");
    let honest = node(&tracker).await;
    assert!(honest.client.list_all().await.expect("list").iter().all(|p| p.node_id != victim.node_id()));
    tracker.stop().await;
}

/// Opens a raw control stream (no qpeer client code) and returns it.
async fn raw_control_stream(
    tracker: &RunningTracker,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let identity = Identity::generate().expect("identity");
    let config =
        qpeer_certs::client_config(&identity, &ServerTrust::Pinned(tracker.id), &[ALPN]).expect("config");
    let conn = endpoint()
        .connect_with(config, tracker.addr, PINNED_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let (send, recv) = conn.open_bi().await.expect("stream");
    (conn, send, recv)
}

#[tokio::test]
async fn bad_frames_close_only_the_offender() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let a = node(&tracker).await;
    let mut b = node(&tracker).await;

    let (conn, mut send, _recv) = raw_control_stream(&tracker).await;
    send.write_all(&(u32::MAX).to_be_bytes()).await.expect("write");
    assert_eq!(close_code_of(&conn).await, Some(close_code::FRAME_TOO_LARGE.into()));

    let (conn, mut send, _recv) = raw_control_stream(&tracker).await;
    send.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]).await.expect("write");
    assert_eq!(close_code_of(&conn).await, Some(close_code::PROTOCOL_VIOLATION.into()));

    // A valid Register of an unknown version.
    let (conn, mut send, _recv) = raw_control_stream(&tracker).await;
    let frame = qpeer_wire::codec::encode_frame(
        &qpeer_wire::tracker::ClientFrame::Register {
            version: 99,
            candidates: vec![],
            name: None,
            incarnation: 0,
            visitor: false,
        },
        qpeer_wire::tracker::MAX_FRAME_LEN,
    )
    .expect("encode");
    send.write_all(&frame).await.expect("write");
    assert_eq!(close_code_of(&conn).await, Some(close_code::UNSUPPORTED_VERSION.into()));

    // The honest nodes are still served.
    assert_eq!(a.client.list_all().await.expect("list").len(), 2);
    a.client.introduce(b.identity.node_id()).await.expect("introduce");
    assert!(tokio::time::timeout(Duration::from_secs(5), b.intros.recv()).await.is_ok());
    tracker.stop().await;
}

#[tokio::test]
async fn half_sent_frame_times_out() {
    let limits = Limits { partial_frame_timeout: Duration::from_millis(300), ..Limits::default() };
    let tracker = RunningTracker::start(limits).await;
    let (conn, mut send, _recv) = raw_control_stream(&tracker).await;
    send.write_all(&[0, 0, 0, 40, 1, 2]).await.expect("write");
    assert_eq!(close_code_of(&conn).await, Some(close_code::TIMEOUT.into()));
    tracker.stop().await;
}

#[tokio::test]
async fn max_nodes_limit_closes_the_newcomer() {
    let limits = Limits { max_nodes: 2, ..Limits::default() };
    let tracker = RunningTracker::start(limits).await;
    let a = node(&tracker).await;
    let _b = node(&tracker).await;
    let err =
        register(&tracker, Identity::generate().expect("identity")).await.expect_err("third must be refused");
    match err {
        ClientError::Connection(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, close_code::TRACKER_FULL.into());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(a.client.list_all().await.expect("list").len(), 2);
    tracker.stop().await;
}

#[tokio::test]
async fn introduction_rate_limit_returns_a_typed_error() {
    let limits = Limits { introductions_per_sec: 1, introduction_burst: 2, ..Limits::default() };
    let tracker = RunningTracker::start(limits).await;
    let a = node(&tracker).await;
    let b = node(&tracker).await;
    let target = b.identity.node_id();
    a.client.introduce(target).await.expect("first");
    a.client.introduce(target).await.expect("second");
    assert!(matches!(
        a.client.introduce(target).await,
        Err(ClientError::Refused { kind: ErrorKind::RateLimited, .. })
    ));
    // Other nodes are not limited by a's bucket.
    b.client.introduce(a.identity.node_id()).await.expect("b is not limited");
    tracker.stop().await;
}

/// True when the handshake was refused before TLS (`Incoming::refuse`).
fn refused_before_tls(err: &ClientError) -> bool {
    matches!(
        err,
        ClientError::Connection(quinn::ConnectionError::ConnectionClosed(close))
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
    )
}

#[tokio::test]
async fn connections_per_ip_limit_refuses_the_extra_connection_before_tls() {
    let limits = Limits { max_connections_per_ip: 2, ..Limits::default() };
    let tracker = RunningTracker::start(limits).await;
    let a = node(&tracker).await;
    let b = node(&tracker).await;
    let err = register(&tracker, Identity::generate().expect("identity"))
        .await
        .expect_err("third connection from 127.0.0.1 must be refused");
    assert!(refused_before_tls(&err), "unexpected {err:?}");
    assert_eq!(a.client.list_all().await.expect("list").len(), 2);
    // A slot frees when its connection ends.
    b.client.close().await;
    let _c = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match register(&tracker, Identity::generate().expect("identity")).await {
                Ok(node) => return node,
                Err(e) if refused_before_tls(&e) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
    })
    .await
    .expect("a freed slot admits a new connection");
    tracker.stop().await;
}

/// Sends a real QUIC Initial from `socket` to the tracker and never answers what comes
/// back: the connection stays in its handshake on the tracker's side.
async fn start_a_handshake_and_go_silent(socket: &tokio::net::UdpSocket, tracker: &RunningTracker) {
    let config = qpeer_certs::client_config(
        &Identity::generate().expect("identity"),
        &ServerTrust::Pinned(tracker.id),
        &[ALPN],
    )
    .expect("config");
    let mut endpoint =
        quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
    let now = std::time::Instant::now();
    let (_, mut conn) = endpoint.connect(now, config, tracker.addr, PINNED_SERVER_NAME).expect("connect");
    let mut datagram = Vec::new();
    let transmit = conn.poll_transmit(now, 1, &mut datagram).expect("an Initial to send");
    socket.send_to(&datagram[..transmit.size], tracker.addr).await.expect("send the Initial");
}

#[tokio::test]
async fn handshakes_left_open_do_not_lock_their_address_out() {
    // One connection per address. A silent handshake (as a forger of this address's Initials
    // would leave) holds the one unproven slot; the real client is asked to prove its address
    // with a Retry, gets in, and then holds the one proven slot: a further one is refused.
    let limits = Limits { max_connections_per_ip: 1, ..Limits::default() };
    let tracker = RunningTracker::start(limits).await;
    let silent = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("socket");
    start_a_handshake_and_go_silent(&silent, &tracker).await;
    // The tracker answers the Initial and waits for the rest of the handshake.
    let mut answer = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(5), silent.recv(&mut answer))
        .await
        .expect("the tracker answers the Initial")
        .expect("recv");
    let _real = register(&tracker, Identity::generate().expect("identity"))
        .await
        .expect("a handshake left open does not hold the address's owner off");
    let err = register(&tracker, Identity::generate().expect("identity"))
        .await
        .expect_err("the address holds its one proven connection");
    assert!(refused_before_tls(&err), "unexpected {err:?}");
    tracker.stop().await;
}

async fn next_line(events: &mut ServerEvents) -> String {
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("events flow while the tracker runs");
    event.to_string()
}

#[tokio::test]
async fn console_events_arrive_in_order_only_when_asked_for() {
    let identity = Arc::new(Identity::generate().expect("identity"));
    let mut quiet =
        Tracker::bind(TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), identity.clone())).expect("bind");
    assert!(quiet.events().is_none(), "no console, no events");
    drop(quiet);

    let mut config = TrackerConfig::new((Ipv4Addr::LOCALHOST, 0).into(), identity);
    config.console = true;
    let mut tracker = Tracker::bind(config).expect("bind");
    let mut events = tracker.events().expect("console events");
    assert!(tracker.events().is_none(), "taken once");
    let (addr, id, tracker_string) = (tracker.local_addr(), tracker.node_id(), tracker.tracker_string());
    let stats = tracker.stats();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(tracker.run(async {
        let _ = stopped.await;
    }));
    let running = RunningTracker { stats, addr, addrs: vec![addr], id, stop: Some(stop), task };
    let mut lines = Vec::new();
    for _ in 0..3 {
        lines.push(next_line(&mut events).await);
    }
    assert_eq!(
        lines,
        [
            "[STARTING] tracker server is starting...".to_string(),
            format!("[LISTENING] Server is listening on {addr}"),
            format!("[TRACKER] {tracker_string}"),
        ]
    );
    let a = node(&running).await;
    let short = a.identity.node_id().short();
    let local = a.endpoint.local_addr().expect("addr");
    assert_eq!(
        next_line(&mut events).await,
        format!("[NEW CONNECTION] {local} connected. node {short}\n[ACTIVE CONNECTIONS] 1")
    );
    a.client.close().await;
    let gone = next_line(&mut events).await;
    assert!(gone.starts_with(&format!("[DISCONNECTED] {local} node {short} (")), "{gone}");
    assert!(gone.ends_with(")\n[ACTIVE CONNECTIONS] 0"), "{gone}");
    running.stop().await;
}

#[tokio::test]
async fn shutdown_closes_nodes_with_a_reason() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let a = node(&tracker).await;
    tracker.stop().await;
    assert_eq!(close_code_of(a.client.connection()).await, Some(close_code::SHUTDOWN.into()));
}

/// Writes one relay frame on a fresh uni stream to the tracker.
async fn send_relay_frames(node: &TestNode, frames: &[(u32, &[u8])]) -> quinn::SendStream {
    let mut send = node.client.connection().open_uni().await.expect("relay stream");
    let mut bytes = Vec::new();
    for (link, packet) in frames {
        qpeer_wire::relay_frame::encode_relay_frame(*link, packet, &mut bytes).expect("frame");
    }
    send.write_all(&bytes).await.expect("write");
    send
}

#[tokio::test]
async fn relay_opens_when_both_ask_and_carries_packets_between_them() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let mut a = node(&tracker).await;
    let mut b = node(&tracker).await;
    a.client.introduce(b.identity.node_id()).await.expect("introduce");
    next_introduction(&mut b).await;
    a.client.request_relay(b.identity.node_id()).await.expect("a asks");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), a.intros.recv()).await.is_err(),
        "no link until both asked"
    );
    b.client.request_relay(a.identity.node_id()).await.expect("b asks");
    let link = match next_event(&mut a).await {
        TrackerEvent::RelayReady { peer, link } if peer == b.identity.node_id() => link,
        other => panic!("{other:?}"),
    };
    assert!(
        matches!(next_event(&mut b).await, TrackerEvent::RelayReady { peer, link: l } if peer == a.identity.node_id() && l == link)
    );

    let _stream = send_relay_frames(&a, &[(link, b"opaque packet")]).await;
    let mut from_tracker = tokio::time::timeout(Duration::from_secs(5), b.client.connection().accept_uni())
        .await
        .expect("the tracker opens a relay stream to b")
        .expect("stream");
    let mut got = [0u8; 6 + 13];
    from_tracker.read_exact(&mut got).await.expect("frame");
    let mut decoder = qpeer_wire::relay_frame::RelayDecoder::default();
    decoder.extend(&got);
    let frame = decoder.next_frame().expect("a whole frame");
    assert_eq!((frame.link(), frame.packet()), (link, &b"opaque packet"[..]));
    assert_eq!(tracker.stats.relayed_bytes(), 13);
    tracker.stop().await;
}

#[tokio::test]
async fn relay_never_reaches_a_node_that_did_not_agree() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let mut a = node(&tracker).await;
    let mut b = node(&tracker).await;
    let c = node(&tracker).await;
    // c was never introduced to a: refused.
    assert!(matches!(
        c.client.request_relay(a.identity.node_id()).await,
        Err(ClientError::Refused { kind: ErrorKind::NotIntroduced, .. })
    ));
    // a was introduced to b and asks, b never does: no link, so nothing is forwarded.
    a.client.introduce(b.identity.node_id()).await.expect("introduce");
    next_introduction(&mut b).await;
    a.client.request_relay(b.identity.node_id()).await.expect("a asks");
    let guesses: Vec<(u32, &[u8])> = (0..50u32).map(|link| (link, &b"let me in"[..])).collect();
    let _stream = send_relay_frames(&a, &guesses).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.client.connection().accept_uni()).await.is_err(),
        "b must receive nothing"
    );
    assert!(tracker.stats.relay_dropped() >= 50, "dropped {}", tracker.stats.relay_dropped());
    assert_eq!(tracker.stats.relayed_bytes(), 0);
    assert_eq!(tracker.stats.relay_links(), 0);
    assert!(a.intros.try_recv().is_err());
    tracker.stop().await;
}

#[tokio::test]
async fn a_link_member_cannot_use_another_pairs_link() {
    let tracker = RunningTracker::start(Limits::default()).await;
    let mut a = node(&tracker).await;
    let mut b = node(&tracker).await;
    let mut c = node(&tracker).await;
    a.client.introduce(b.identity.node_id()).await.expect("introduce");
    next_introduction(&mut b).await;
    a.client.request_relay(b.identity.node_id()).await.expect("a");
    b.client.request_relay(a.identity.node_id()).await.expect("b");
    let link = match next_event(&mut a).await {
        TrackerEvent::RelayReady { link, .. } => link,
        other => panic!("{other:?}"),
    };
    // c learns (or guesses) a-b's link id and tries to inject into it.
    let _stream = send_relay_frames(&c, &[(link, b"forged")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tracker.stats.relayed_bytes(), 0);
    assert!(tracker.stats.relay_dropped() >= 1);
    assert!(c.intros.try_recv().is_err());
    tracker.stop().await;
}

/// A second loopback address (Linux routes all of 127/8 to `lo`).
fn second_loopback() -> SocketAddr {
    (Ipv4Addr::new(127, 0, 0, 2), 0).into()
}

#[tokio::test]
async fn a_tracker_on_two_addresses_shares_one_registry_and_tells_nodes_the_other() {
    let tracker = RunningTracker::start_on(Limits::default(), vec![second_loopback()]).await;
    assert_eq!(tracker.addrs.len(), 2);
    let (first, second) = (tracker.addrs[0], tracker.addrs[1]);
    let a = register_at(&tracker, first, Identity::generate().expect("identity")).await.expect("a");
    let b = register_at(&tracker, second, Identity::generate().expect("identity")).await.expect("b");
    assert_eq!(a.client.other_addrs(), &[second]);
    assert_eq!(b.client.other_addrs(), &[first]);
    assert_eq!(a.client.list_all().await.expect("list").len(), 2);
    let intro = a.client.introduce(b.identity.node_id()).await.expect("introduce across addresses");
    assert_eq!(intro.addrs.observed, b.client.observed_addr());
    tracker.stop().await;
}

#[tokio::test]
async fn unspecified_binds_are_not_told_to_nodes() {
    let tracker = RunningTracker::start_on(Limits::default(), vec![(Ipv4Addr::UNSPECIFIED, 0).into()]).await;
    let a = node(&tracker).await;
    assert!(a.client.other_addrs().is_empty());
    tracker.stop().await;
}

#[tokio::test]
async fn observe_answers_from_the_same_endpoint_without_replacing_the_registration() {
    let tracker = RunningTracker::start_on(Limits::default(), vec![second_loopback()]).await;
    let a = node(&tracker).await;
    let other = a.client.other_addrs()[0];
    let config = TrackerClient::config(&a.identity, &ServerTrust::Pinned(tracker.id)).expect("config");
    let observed = TrackerClient::observe(
        &a.endpoint,
        config,
        other,
        PINNED_SERVER_NAME,
        &ServerTrust::Pinned(tracker.id),
    )
    .await
    .expect("observe");
    // One socket, no NAT: both addresses see the same source.
    assert_eq!(observed.observed, a.client.observed_addr());
    // The registration is untouched: still listed, still answering.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.client.connection().close_reason().is_none());
    assert_eq!(tracker.stats.registered(), 1);
    assert_eq!(a.client.list_all().await.expect("list").len(), 1);
    tracker.stop().await;
}

#[tokio::test]
async fn observe_pins_the_tracker_id() {
    let tracker = RunningTracker::start_on(Limits::default(), vec![second_loopback()]).await;
    let a = node(&tracker).await;
    let impostor = Identity::generate().expect("identity").node_id();
    let trust = ServerTrust::Pinned(impostor);
    let config = TrackerClient::config(&a.identity, &trust).expect("config");
    let result =
        TrackerClient::observe(&a.endpoint, config, tracker.addrs[1], PINNED_SERVER_NAME, &trust).await;
    assert!(matches!(result, Err(ClientError::WrongTracker { .. })), "{result:?}");
    tracker.stop().await;
}

#[tokio::test]
async fn an_announced_mapping_reaches_peers_in_introductions() {
    use qpeer_wire::tracker::Mapping;
    let tracker = RunningTracker::start(Limits::default()).await;
    let a = node(&tracker).await;
    let mut b = node(&tracker).await;
    a.client.announce_mapping(Mapping::EndpointDependent).await.expect("announce");
    // A request on the same stream: the tracker has read the announcement once it answers.
    a.client.list_all().await.expect("list");
    let intro = b.client.introduce(a.identity.node_id()).await.expect("introduce");
    assert_eq!(intro.mapping, Mapping::EndpointDependent);
    let at_a_side = a.client.introduce(b.identity.node_id()).await.expect("introduce back");
    assert_eq!(at_a_side.mapping, Mapping::Unknown);
    let _ = next_introduction(&mut b).await;
    tracker.stop().await;
}
