//! Hostile clients against a running tracker and a running node (the real binaries), speaking
//! QUIC with quinn directly. Each attack must be refused with its documented reason, nothing
//! may panic, the tracker's memory must stay bounded, and honest nodes must keep registering,
//! pinging and transferring throughout.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use qpeer_certs::{Identity, ServerTrust};
use qpeer_node::transfer::receive::{AcceptPolicy, ReceiveConfig, Receiver};
use qpeer_node::transfer::scan::scan;
use qpeer_node::transfer::send::send;
use qpeer_node::Events;
use qpeer_node::Node;
use qpeer_tests::lab::bin_dir;
use qpeer_tests::procs::{Proc, TrackerProc};
use qpeer_tracker::client::RegisterInfo;
use qpeer_tracker::{ClientError, TrackerClient};
use qpeer_wire::close_code;
use qpeer_wire::tracker::ErrorKind;
use quinn::{ConnectionError, TransportErrorCode};

/// Attackers come from another loopback address, so per-address limits apply to them alone.
const ATTACKER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

fn attacker_endpoint() -> Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client((ATTACKER_IP, 0).into())?)
}

/// What the attacker presents.
enum Cert {
    Valid,
    None,
    P256,
}

fn config(alpn: &[u8], cert: Cert) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(qpeer_certs::config::crypto_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(qpeer_certs::verify::PinnedServerVerifier::new(
            qpeer_certs::verify::ExpectedPeer::Any,
        ));
    let mut tls = match cert {
        Cert::Valid => {
            let id = Identity::generate()?;
            builder.with_client_auth_cert(vec![id.self_signed_cert()?], id.private_key_der())?
        }
        Cert::None => builder.with_no_client_auth(),
        Cert::P256 => {
            let key = rcgen_key()?;
            let cert = rcgen::CertificateParams::new(vec!["x".to_string()])?.self_signed(&key)?;
            builder.with_client_auth_cert(
                vec![cert.der().clone()],
                key.serialize_der().try_into().map_err(anyhow::Error::msg)?,
            )?
        }
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?)))
}

fn rcgen_key() -> Result<rcgen::KeyPair> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// Connects and returns how the connection ended (handshake refusal or later close).
async fn outcome(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
) -> ConnectionError {
    match endpoint.connect_with(config, addr, "qpeer") {
        Err(e) => panic!("cannot start: {e}"),
        Ok(connecting) => match connecting.await {
            Err(e) => e,
            Ok(conn) => tokio::time::timeout(Duration::from_secs(15), conn.closed())
                .await
                .unwrap_or(ConnectionError::TimedOut),
        },
    }
}

fn is_crypto(err: &ConnectionError) -> bool {
    let code = match err {
        ConnectionError::ConnectionClosed(c) => c.error_code,
        ConnectionError::TransportError(e) => e.code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

fn crypto_alert(err: &ConnectionError, alert: u8) -> bool {
    let code = match err {
        ConnectionError::ConnectionClosed(c) => c.error_code,
        ConnectionError::TransportError(e) => e.code,
        _ => return false,
    };
    code == TransportErrorCode::crypto(alert)
}

fn app_code(err: &ConnectionError) -> Option<u64> {
    match err {
        ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        _ => None,
    }
}

/// The TLS-level attacks every qpeer server must refuse.
async fn tls_attacks(addr: SocketAddr, alpn: &[u8]) -> Result<()> {
    let endpoint = attacker_endpoint()?;
    let wrong_alpn = outcome(&endpoint, config(b"evil/1", Cert::Valid)?, addr).await;
    ensure!(crypto_alert(&wrong_alpn, 120), "wrong ALPN: {wrong_alpn}");
    let no_cert = outcome(&endpoint, config(alpn, Cert::None)?, addr).await;
    ensure!(crypto_alert(&no_cert, 116), "no client certificate: {no_cert}");
    let p256 = outcome(&endpoint, config(alpn, Cert::P256)?, addr).await;
    ensure!(is_crypto(&p256), "P-256 client certificate: {p256}");
    Ok(())
}

/// A valid connection to the tracker with its control stream open.
async fn tracker_stream(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<(quinn::Connection, quinn::SendStream)> {
    let conn = endpoint.connect_with(config(qpeer_wire::tracker::ALPN, Cert::Valid)?, addr, "qpeer")?.await?;
    let (send, _recv) = conn.open_bi().await?;
    Ok((conn, send))
}

async fn closed_with(conn: &quinn::Connection) -> Option<u64> {
    app_code(&tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.ok()?)
}

async fn tracker_attacks(addr: SocketAddr, victim: qpeer_certs::NodeId) -> Result<()> {
    tls_attacks(addr, qpeer_wire::tracker::ALPN).await?;
    let endpoint = attacker_endpoint()?;

    let (conn, mut send) = tracker_stream(&endpoint, addr).await?;
    send.write_all(b"\x00\x00\x00\x08garbage!").await?;
    ensure!(closed_with(&conn).await == Some(close_code::PROTOCOL_VIOLATION.into()), "garbage");

    let (conn, mut send) = tracker_stream(&endpoint, addr).await?;
    send.write_all(&u32::MAX.to_be_bytes()).await?;
    ensure!(closed_with(&conn).await == Some(close_code::FRAME_TOO_LARGE.into()), "4 GiB prefix");

    let (conn, mut send) = tracker_stream(&endpoint, addr).await?;
    send.write_all(&[0, 0, 0, 50, 1, 2, 3]).await?;
    ensure!(closed_with(&conn).await == Some(close_code::TIMEOUT.into()), "truncated frame");

    // Thousands of streams: the tracker grants one control stream and one relay stream.
    let (conn, _send) = tracker_stream(&endpoint, addr).await?;
    let mut extra_bi = 0;
    for _ in 0..2000 {
        match tokio::time::timeout(Duration::from_millis(2), conn.open_bi()).await {
            Ok(Ok(_)) => extra_bi += 1,
            _ => break,
        }
    }
    ensure!(extra_bi == 0, "the tracker granted {extra_bi} extra bidirectional streams");
    let _relay = conn.open_uni().await?;
    ensure!(
        tokio::time::timeout(Duration::from_millis(100), conn.open_uni()).await.is_err(),
        "a second relay stream was granted"
    );
    conn.close(0u32.into(), b"done");

    // Hundreds of connections that try to complete the handshake and go silent. Those over
    // the per-address limit are refused before TLS (a transport CONNECTION_REFUSED).
    let mut silent = Vec::new();
    let opening = Instant::now();
    for _ in 0..150 {
        silent.push(
            endpoint.connect_with(config(qpeer_wire::tracker::ALPN, Cert::Valid)?, addr, "qpeer")?.await,
        );
    }
    let mut too_many = 0;
    let mut timed_out = 0;
    for handshake in &silent {
        let ended = match handshake {
            Ok(conn) => tokio::time::timeout(Duration::from_secs(15), conn.closed()).await,
            Err(refused) => Ok(refused.clone()),
        };
        let refused_before_tls = matches!(
            &ended,
            Ok(ConnectionError::ConnectionClosed(close))
                if close.error_code == TransportErrorCode::CONNECTION_REFUSED
        );
        match ended.as_ref().ok().and_then(app_code).map(|c| c as u32) {
            _ if refused_before_tls => too_many += 1,
            Some(close_code::TOO_MANY_CONNECTIONS) => too_many += 1,
            Some(close_code::TIMEOUT) => timed_out += 1,
            _ => bail!("silent connection ended with {ended:?}"),
        }
    }
    // 32 at a time (--max-connections-per-ip): each admitted one holds its slot until its
    // 1 s register timeout, so a slow machine that took longer to open them all admits a
    // further 32 per second it took.
    let admitted_at_most = 32 * (1 + opening.elapsed().as_secs() as usize);
    ensure!(
        timed_out <= admitted_at_most && too_many + timed_out == 150,
        "too many: {too_many}, timed out: {timed_out} (at most {admitted_at_most} admitted in {:?})",
        opening.elapsed()
    );
    eprintln!("silent tracker connections: {too_many} over the per-address limit, {timed_out} timed out");

    // A flood of introductions from a registered attacker.
    let attacker_id = Identity::generate()?;
    let (client, _events) = TrackerClient::connect(
        &endpoint,
        &attacker_id,
        addr,
        "qpeer",
        &ServerTrust::FirstUse,
        RegisterInfo::default(),
    )
    .await?;
    let mut limited = 0;
    for _ in 0..300 {
        match client.introduce(victim).await {
            Err(ClientError::Refused { kind: ErrorKind::RateLimited, .. }) => limited += 1,
            Ok(_) => {}
            Err(e) => bail!("introduction flood: unexpected {e}"),
        }
    }
    ensure!(limited >= 250, "only {limited} of 300 introductions were rate-limited");
    eprintln!("introduction flood: {limited} of 300 rate-limited");
    // Relay packets to a node that never agreed: nothing reaches it (the honest loop keeps
    // checking the victim), and the attacker is not disconnected for trying.
    let mut relay = client.connection().open_uni().await?;
    let mut frames = Vec::new();
    for link in 0..1000u32 {
        qpeer_wire::relay_frame::encode_relay_frame(link, b"let me in", &mut frames)?;
    }
    relay.write_all(&frames).await?;
    client.close().await;
    Ok(())
}

async fn node_attacks(
    addr: SocketAddr,
    tracker: qpeer_tracker::TrackerAddr,
    attacked: qpeer_certs::NodeId,
) -> Result<()> {
    // A stranger (no introduction, no signed probe) gets no answer at all: the path layer
    // hands QUIC nothing from an address of no session, whatever it presents.
    let mut endpoint = attacker_endpoint()?;
    let mut quick = quinn::TransportConfig::default();
    quick.max_idle_timeout(Some(Duration::from_secs(2).try_into()?));
    let quick = Arc::new(quick);
    let mut silent = 0;
    for cert in [Cert::Valid, Cert::None, Cert::P256] {
        let mut client = config(qpeer_wire::peer::ALPN, cert)?;
        client.transport_config(quick.clone());
        endpoint.set_default_client_config(client.clone());
        let result = endpoint.connect_with(client, addr, "qpeer")?.await;
        ensure!(
            matches!(result, Err(ConnectionError::TimedOut)),
            "a stranger's handshake was answered: {result:?}"
        );
        silent += 1;
    }
    let garbage = tokio::net::UdpSocket::bind((ATTACKER_IP, 0)).await?;
    let mut forged = qpeer_wire::probe::MAGIC.to_vec();
    forged.resize(qpeer_wire::probe::PROBE_LEN, 0xab);
    for i in 0..500u32 {
        garbage.send_to(&i.to_be_bytes().repeat(300), addr).await?;
        garbage.send_to(&forged, addr).await?;
    }
    let mut reply = [0u8; 2048];
    let answered = tokio::time::timeout(Duration::from_millis(500), garbage.recv_from(&mut reply)).await;
    ensure!(answered.is_err(), "the node answered garbage or a forged probe");
    eprintln!("strangers: {silent} handshakes and 1000 garbage datagrams, none answered");

    // An introduced peer that breaks the node protocol.
    let home = tempfile::tempdir()?;
    let peer = Node::builder()
        .home(home.path())
        .bind_addr(([127, 0, 0, 2], 0).into())
        .tracker(tracker)
        .bind()
        .await?;
    peer.registered(Duration::from_secs(10)).await?;
    let conn = peer.connect(attacked).await?;
    let (mut send, _recv) = conn.connection().open_bi().await?;
    send.write_all(&[0xee, 1, 2, 3]).await?;
    ensure!(
        closed_with(conn.connection()).await == Some(qpeer_wire::close_code::PEER_PROTOCOL_VIOLATION.into()),
        "unknown stream kind"
    );

    // Thousands of streams: at most 256 at once.
    let conn = peer.connect(attacked).await?;
    let mut open = Vec::new();
    for _ in 0..2000 {
        match tokio::time::timeout(Duration::from_millis(20), conn.connection().open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                send.write_all(&[2]).await?;
                open.push((send, recv));
            }
            _ => break,
        }
    }
    ensure!(open.len() <= 256, "{} concurrent streams were granted", open.len());
    eprintln!("stream flood on the node: {} concurrent streams granted", open.len());
    conn.close(0, "done");
    drop(open);
    peer.shutdown().await;
    Ok(())
}

/// Honest traffic on a loop: a fresh registration, pings between the honest pair and to the
/// attacked node, and a small transfer; counts rounds and failures.
async fn honest_loop(
    tracker: qpeer_tracker::TrackerAddr,
    a: Arc<Node>,
    b: Arc<Node>,
    attacked: qpeer_certs::NodeId,
    file: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let home = tempfile::tempdir()?;
        let fresh = Node::builder()
            .home(home.path())
            .bind_addr(([127, 0, 0, 1], 0).into())
            .tracker(tracker.clone())
            .bind()
            .await?;
        fresh.registered(Duration::from_secs(10)).await.context("an honest node could not register")?;
        fresh.shutdown().await;
        let conn = a.connect(b.id()).await.context("honest connect")?;
        conn.ping(rounds.load(Ordering::Relaxed)).await.context("honest ping")?;
        a.connect(attacked)
            .await
            .context("connect to the attacked node")?
            .ping(1)
            .await
            .context("ping the attacked node")?;
        let paths = vec![file.clone()];
        let plan = tokio::task::spawn_blocking(move || scan(&paths)).await??;
        send(&conn, plan, &Events::new()).await.context("honest transfer")?;
        rounds.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow (about a minute): run with --ignored, as .ci/run does"]
async fn hostile_clients_are_refused_and_honest_nodes_carry_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tracker = TrackerProc::start(
        &dir.path().join("trk"),
        "127.0.0.1:0",
        &["--register-timeout", "1", "--frame-timeout", "1", "--max-connections-per-ip", "32"],
    )?;
    let tracker_addr: SocketAddr = tracker.addr.parse()?;
    let node_home = |n: &str| dir.path().join(n);
    let a = Arc::new(
        Node::builder()
            .home(node_home("a"))
            .bind_addr(([127, 0, 0, 1], 0).into())
            .tracker(tracker.tracker.clone())
            .bind()
            .await?,
    );
    let b = Arc::new(
        Node::builder()
            .home(node_home("b"))
            .bind_addr(([127, 0, 0, 1], 0).into())
            .tracker(tracker.tracker.clone())
            .bind()
            .await?,
    );
    a.registered(Duration::from_secs(10)).await?;
    b.registered(Duration::from_secs(10)).await?;
    let inbox = dir.path().join("inbox");
    let receiver =
        Receiver::new(ReceiveConfig { out: Some(inbox), policy: AcceptPolicy::Any, events: Events::new() });
    let accepting = b.accept_handle();
    tokio::spawn(async move {
        while let Some(conn) = accepting.accept().await {
            tokio::spawn(receiver.clone().serve(conn));
        }
    });

    // The attacked node: a real `qpeer listen` process.
    let attacked = Proc::start(
        &bin_dir()?.join("qpeer"),
        &[
            "listen".into(),
            "--home".into(),
            node_home("n").display().to_string(),
            "--tracker".into(),
            tracker.tracker.to_string(),
            "--bind".into(),
            "127.0.0.1:0".into(),
        ],
    )?;
    let listening = attacked.stdout.wait_for(Duration::from_secs(10), |l| l.starts_with("[LISTENING]"))?;
    let attacked_addr: SocketAddr = listening
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(';').parse().ok())
        .context("no address in [LISTENING]")?;
    let attacked_id: qpeer_certs::NodeId = listening.split_whitespace().nth(2).context("no id")?.parse()?;

    let file = dir.path().join("honest.bin");
    std::fs::write(&file, vec![7u8; 256 * 1024])?;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let honest = tokio::spawn(honest_loop(
        tracker.tracker.clone(),
        a.clone(),
        b.clone(),
        attacked_id,
        file,
        stop.clone(),
        rounds.clone(),
    ));

    let rss_before = tracker.proc.rss_kib().context("tracker RSS")?;
    let started = Instant::now();
    tracker_attacks(tracker_addr, a.id()).await.context("tracker attacks")?;
    node_attacks(attacked_addr, tracker.tracker.clone(), attacked_id).await.context("node attacks")?;
    let rss_after = tracker.proc.rss_kib().context("tracker RSS")?;
    eprintln!("attacks took {:?}; tracker RSS {rss_before} KiB -> {rss_after} KiB", started.elapsed());

    stop.store(true, Ordering::Relaxed);
    honest.await??;
    let rounds = rounds.load(Ordering::Relaxed);
    ensure!(rounds >= 5, "honest nodes completed only {rounds} rounds during the attacks");
    eprintln!("honest rounds during the attacks: {rounds}");
    ensure!(
        rss_after < rss_before + 64 * 1024 && rss_after < 256 * 1024,
        "tracker memory grew to {rss_after} KiB"
    );
    // Nothing panicked: both processes are still running.
    let mut tracker = tracker;
    ensure!(tracker.proc.child.try_wait()?.is_none(), "the tracker exited: {}", tracker.proc.stderr.text());
    let mut attacked = attacked;
    ensure!(attacked.child.try_wait()?.is_none(), "the node exited: {}", attacked.stderr.text());
    ensure!(!tracker.proc.stderr.text().contains("panicked"), "{}", tracker.proc.stderr.text());
    ensure!(!attacked.stderr.text().contains("panicked"), "{}", attacked.stderr.text());
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
