//! qpeer-tests: cross-crate integration tests and the helpers they share.
//!
//! # Layout
//! - [`TestTracker`]: an in-process tracker on `127.0.0.1:0` that can be stopped and restarted
//!   on the same address with the same identity.
//! - [`node`]: a node bound to `127.0.0.1:0` with a throwaway home.
//! - [`dht`]: trackers joined by a private DHT, in one process.
//! - [`wan`]: an emulated WAN (delay, loss, rate) between namespaces, for `qpeer-bench wan`.
//! - Tests live in `tests/tests/`.

pub mod dht;
pub mod lab;
pub mod lab_run;
pub mod procs;
pub mod wan;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use qpeer_certs::Identity;
use qpeer_node::Node;
use qpeer_tracker::{Limits, Tracker, TrackerAddr, TrackerConfig};
use tokio::sync::oneshot;

/// An in-process tracker.
pub struct TestTracker {
    pub identity: Arc<Identity>,
    pub addr: SocketAddr,
    limits: Limits,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    stats: Option<qpeer_tracker::server::TrackerStats>,
}

impl TestTracker {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Limits::default())
    }

    pub fn start_with(limits: Limits) -> anyhow::Result<Self> {
        let identity = Arc::new(Identity::generate()?);
        let mut tracker = Self {
            identity,
            addr: (Ipv4Addr::LOCALHOST, 0).into(),
            limits,
            stop: None,
            task: None,
            stats: None,
        };
        tracker.launch()?;
        Ok(tracker)
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let mut config = TrackerConfig::new(self.addr, self.identity.clone());
        config.limits = self.limits.clone();
        let tracker = Tracker::bind(config)?;
        self.addr = tracker.local_addr();
        self.stats = Some(tracker.stats());
        let (stop, stopped) = oneshot::channel::<()>();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(tracker.run(async {
            let _ = stopped.await;
        })));
        Ok(())
    }

    /// Counters of the running tracker (relayed bytes, drops, registrations).
    pub fn stats(&self) -> qpeer_tracker::server::TrackerStats {
        self.stats.clone().expect("the tracker is running")
    }

    /// The pinned `ID@IP:PORT` address nodes use.
    pub fn tracker_addr(&self) -> TrackerAddr {
        TrackerAddr {
            node_id: Some(self.identity.node_id()),
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
        }
    }

    /// Stops the tracker (connections closed with the shutdown code) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }

    /// Starts again on the same address with the same identity.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.launch()
    }
}

impl Drop for TestTracker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A node on 127.0.0.1:0 with its own temporary home, registered with `tracker`.
pub struct TestNode {
    pub node: Node,
    pub home: tempfile::TempDir,
}

impl std::ops::Deref for TestNode {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

pub async fn node(tracker: &TestTracker) -> anyhow::Result<TestNode> {
    let home = tempfile::tempdir()?;
    let node = node_in_home(tracker, home.path()).await?;
    Ok(TestNode { node, home })
}

/// A node on 127.0.0.1:0 using the identity in `home`, registered with `tracker`.
pub async fn node_in_home(tracker: &TestTracker, home: &std::path::Path) -> anyhow::Result<Node> {
    let node = Node::builder()
        .home(home)
        .bind_addr((Ipv4Addr::LOCALHOST, 0).into())
        .tracker(tracker.tracker_addr())
        .bind()
        .await?;
    node.registered(Duration::from_secs(10)).await?;
    Ok(node)
}

/// Key material both ends of one QUIC connection derive alike, and no other connection shares:
/// proves two sides hold the same connection.
pub fn connection_fingerprint(conn: &quinn::Connection) -> anyhow::Result<[u8; 16]> {
    let mut out = [0u8; 16];
    conn.export_keying_material(&mut out, b"qpeer test fingerprint", b"")
        .map_err(|_| anyhow::anyhow!("keying material export failed"))?;
    Ok(out)
}

/// Installs a tracing subscriber once (RUST_LOG), for debugging tests.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Writes `len` pseudo-random bytes (xorshift from `seed`) to `path`, creating parents, in
/// 1 MiB blocks (so a file of gigabytes costs no more memory), and syncs it to disk.
pub fn write_random(path: &std::path::Path, len: usize, seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    const BLOCK: usize = 1 << 20;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::File::create(path)?;
    let mut state = seed | 1;
    let mut block = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK);
        for chunk in block[..n].chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.sync_all()?;
    Ok(())
}

/// Checks that two trees have the same names, kinds and bytes.
pub fn assert_same_tree(expected: &std::path::Path, actual: &std::path::Path) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(expected)?;
    if meta.is_dir() {
        anyhow::ensure!(
            std::fs::symlink_metadata(actual)?.is_dir(),
            "{} is not a directory",
            actual.display()
        );
        let names = |dir: &std::path::Path| -> anyhow::Result<Vec<std::ffi::OsString>> {
            let mut names: Vec<_> =
                std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
            names.sort();
            Ok(names)
        };
        let (want, got) = (names(expected)?, names(actual)?);
        anyhow::ensure!(want == got, "{}: {want:?} != {got:?}", actual.display());
        for name in want {
            assert_same_tree(&expected.join(&name), &actual.join(&name))?;
        }
    } else {
        anyhow::ensure!(std::fs::read(expected)? == std::fs::read(actual)?, "{} differs", actual.display());
    }
    Ok(())
}

/// The sending half of a raw quinn bulk stream (the benchmarks' reference): `bytes` zeros on
/// one bidirectional stream, then waits for the receiver's one-byte acknowledgement of the
/// end.
pub async fn bulk_send(conn: &quinn::Connection, bytes: u64) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let block = bytes::Bytes::from(vec![0u8; 1 << 20]);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        send.write_chunk(block.slice(..n)).await?;
        left -= n as u64;
    }
    send.finish()?;
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack).await?;
    Ok(())
}
