//! qpeer-certs: identities and TLS for qpeer.
//!
//! # Layout
//! - [`node_id`]: [`NodeId`], the 32-byte Ed25519 public key, and its hex text form.
//! - [`home`]: where state lives (`--home`, `$QPEER_HOME`, the platform data dir).
//! - [`identity`]: the long-term key file (created on first use, mode 0600, never replaced).
//! - [`verify`]: rustls verifiers that pin a NodeId (dialer) or accept any Ed25519 node (acceptor).
//! - [`config`]: quinn client/server/endpoint configs (TLS 1.3, ring) built from an identity.
//! - [`ca`]: a development CA for trackers that present CA-issued certificates.
//! - [`error`]: typed errors.

pub mod ca;
pub mod config;
pub mod error;
pub mod home;
pub mod identity;
pub mod node_id;
pub mod verify;

pub use config::{client_config, endpoint_config, server_config, ServerTrust};
pub use error::{IdentityError, PeerCertError, TlsError};
pub use home::resolve_home;
pub use identity::Identity;
pub use node_id::{NodeId, NodeIdParseError, NODE_ID_LEN};
pub use verify::peer_node_id;
