//! `qpeer netcheck`: what kind of network this machine is on, from a node of its own.
//!
//! The node runs on a throwaway identity in a temporary home, so a `qpeer listen` on the
//! same home (which holds its lock and its identity's registration) neither blocks the
//! check nor gets replaced by it. The home's `known_trackers` is copied in, so a tracker
//! trusted there is still pinned.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use qpeer_certs::{resolve_home, Identity};
use qpeer_node::netcheck::mapping_name;
use qpeer_node::{Events, NetReport, NodeError, NodeEvent};

use crate::cli::NodeOpts;

/// A tracker that has not answered over UDP by then is taken as UDP being blocked: a
/// registration takes one round trip plus TLS, well under a second on any usable network,
/// and the whole command must answer within 5 s on a blocked one.
const NO_UDP_AFTER: Duration = Duration::from_secs(3);

/// The longest the check after registering may take (its `Observe` connection has the
/// tracker client's request timeout).
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// The longest the node may take to leave once the answer is printed.
const SHUTDOWN_LIMIT: Duration = Duration::from_millis(500);

/// Name of the file of trusted trackers in a home.
const KNOWN_TRACKERS: &str = "known_trackers";

pub async fn run(opts: &NodeOpts, json: bool) -> Result<ExitCode> {
    let scratch = tempfile::tempdir().context("cannot create a temporary home")?;
    let home = resolve_home(opts.home.as_deref())?;
    if let Err(e) = std::fs::copy(home.join(KNOWN_TRACKERS), scratch.path().join(KNOWN_TRACKERS)) {
        tracing::debug!("no known_trackers copied from {}: {e}", home.display());
    }
    let events = Events::new();
    let mut reports = events.subscribe();
    let identity = Arc::new(Identity::generate().context("cannot create a throwaway identity")?);
    let node = crate::builder(opts, &events).home(scratch.path()).identity(identity).bind().await?;
    let report = match node.registered(NO_UDP_AFTER).await {
        Ok(_) => {
            let checked = async {
                loop {
                    match reports.recv().await {
                        Ok(NodeEvent::NatChecked(report)) => return Some(report),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            };
            tokio::time::timeout(CHECK_TIMEOUT, checked).await.ok().flatten()
        }
        Err(NodeError::RegistrationTimeout { .. }) => Some(NetReport::no_udp()),
        Err(e) => {
            node.shutdown().await;
            return Err(e).context("cannot reach the tracker");
        }
    };
    if let Some(report) = &report {
        if json {
            println!("{}", to_json(report));
        } else {
            print!("{}", to_text(report));
        }
    }
    // A node still trying to reach a silent tracker would otherwise wait out its connect
    // attempt: the answer is out, so the goodbye is bounded.
    let _ = tokio::time::timeout(SHUTDOWN_LIMIT, node.shutdown()).await;
    report.context("the network check did not finish")?;
    Ok(ExitCode::SUCCESS)
}

fn to_json(report: &NetReport) -> serde_json::Value {
    serde_json::json!({
        "udp": report.udp,
        "mapping": mapping_name(report.mapping),
        "public_v4": report.public_v4.map(|a| a.to_string()),
        "public_v6": report.public_v6.map(|a| a.to_string()),
        "rtt_ms": report.rtt_ms.map(|ms| (ms * 10.0).round() / 10.0),
        "relay": report.relay,
        "verdict": report.verdict(),
    })
}

fn to_text(report: &NetReport) -> String {
    let or_none =
        |addr: Option<std::net::SocketAddr>| addr.map_or_else(|| "none".to_string(), |a| a.to_string());
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    format!(
        "udp:        {}\nmapping:    {}\npublic v4:  {}\npublic v6:  {}\nrtt:        {}\nrelay:      {}\nverdict:    {}\n",
        yes_no(report.udp),
        mapping_name(report.mapping),
        or_none(report.public_v4),
        or_none(report.public_v6),
        report.rtt_ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms")),
        yes_no(report.relay),
        report.verdict(),
    )
}

#[cfg(test)]
mod tests {
    use qpeer_node::Mapping;

    use super::*;

    #[test]
    fn json_has_every_field() {
        let mut report = NetReport::no_udp();
        report.udp = true;
        report.mapping = Mapping::EndpointDependent;
        report.public_v4 = Some("203.0.113.9:4000".parse().expect("addr"));
        report.rtt_ms = Some(12.345);
        let json = to_json(&report);
        assert_eq!(json["udp"], true);
        assert_eq!(json["mapping"], "endpoint-dependent");
        assert_eq!(json["public_v4"], "203.0.113.9:4000");
        assert!(json["public_v6"].is_null());
        assert_eq!(json["rtt_ms"], 12.3);
        assert_eq!(json["relay"], false);
        assert!(json["verdict"].as_str().is_some_and(|v| !v.is_empty()));
    }
}
