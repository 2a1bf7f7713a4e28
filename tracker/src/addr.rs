//! The tracker address a node is given: `NODEID@HOST:PORT` (pinned) or `HOST:PORT`
//! (verified by `--tracker-ca`, or trusted on first use).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use qpeer_certs::{NodeId, NodeIdParseError};

/// A parsed `--tracker` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerAddr {
    /// The tracker's NodeId when pinned.
    pub node_id: Option<NodeId>,
    /// Host name or IP literal (IPv6 in brackets in the text form).
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerAddrError {
    #[error("tracker address {0:?} has no port: expected [NODEID@]HOST:PORT")]
    MissingPort(String),
    #[error("tracker address {0:?} has an invalid port")]
    BadPort(String),
    #[error("tracker address {0:?} has an empty host")]
    EmptyHost(String),
    #[error("tracker id in {text:?} is invalid: {source}")]
    BadNodeId { text: String, source: NodeIdParseError },
    #[error("cannot resolve tracker host {host:?}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("tracker host {host:?} has no addresses")]
    NoAddresses { host: String },
}

impl FromStr for TrackerAddr {
    type Err = TrackerAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (node_id, host_port) = match text.split_once('@') {
            Some((id, rest)) => {
                let id = id
                    .parse()
                    .map_err(|source| TrackerAddrError::BadNodeId { text: text.to_string(), source })?;
                (Some(id), rest)
            }
            None => (None, text),
        };
        let (host, port) =
            host_port.rsplit_once(':').ok_or_else(|| TrackerAddrError::MissingPort(text.to_string()))?;
        let port = port.parse().map_err(|_| TrackerAddrError::BadPort(text.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(TrackerAddrError::EmptyHost(text.to_string()));
        }
        Ok(Self { node_id, host: host.to_string(), port })
    }
}

impl fmt::Display for TrackerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = self.node_id {
            write!(f, "{id}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl TrackerAddr {
    /// `HOST:PORT` without the id, as used for `known_trackers` and TLS server names.
    pub fn host_port(&self) -> String {
        Self { node_id: None, ..self.clone() }.to_string()
    }

    /// Resolves the host to socket addresses, preferring IPv4 (IPv6 only when nothing else).
    pub async fn resolve(&self) -> Result<SocketAddr, TrackerAddrError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| TrackerAddrError::Resolve { host: self.host.clone(), source })?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .ok_or_else(|| TrackerAddrError::NoAddresses { host: self.host.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pinned_and_plain_forms() {
        let id = NodeId::from_bytes([0xab; 32]);
        let pinned: TrackerAddr = format!("{id}@127.0.0.1:4433").parse().expect("pinned");
        assert_eq!(pinned.node_id, Some(id));
        assert_eq!((pinned.host.as_str(), pinned.port), ("127.0.0.1", 4433));
        assert_eq!(pinned.to_string(), format!("{id}@127.0.0.1:4433"));
        let v6: TrackerAddr = "[::1]:9".parse().expect("v6");
        assert_eq!((v6.node_id, v6.host.as_str(), v6.port), (None, "::1", 9));
        assert_eq!(v6.to_string(), "[::1]:9");
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!("host".parse::<TrackerAddr>(), Err(TrackerAddrError::MissingPort(_))));
        assert!(matches!("host:x".parse::<TrackerAddr>(), Err(TrackerAddrError::BadPort(_))));
        assert!(matches!(":5".parse::<TrackerAddr>(), Err(TrackerAddrError::EmptyHost(_))));
        assert!(matches!("abc@host:5".parse::<TrackerAddr>(), Err(TrackerAddrError::BadNodeId { .. })));
    }
}
