//! [`NodeId`]: a node's identity, the 32-byte Ed25519 public key of its long-term key.
//!
//! Canonical text form: 64 lowercase hex characters. Hex is unambiguous, easy to copy
//! from a terminal, and parses back exactly; [`NodeId::short`] gives the first 8
//! characters for logs (never for authentication).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length of a NodeId in bytes (an Ed25519 public key).
pub const NODE_ID_LEN: usize = 32;

/// A node's identity: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId([u8; NODE_ID_LEN]);

/// Why a text did not parse as a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdParseError {
    #[error("a NodeId is 64 hex characters, got {0}")]
    Length(usize),
    #[error("a NodeId is lowercase hex (0-9, a-f); found {found:?} at position {position}")]
    Alphabet { found: char, position: usize },
}

impl NodeId {
    pub const fn from_bytes(bytes: [u8; NODE_ID_LEN]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// True when `signature` is this node's Ed25519 signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }

    /// First 8 hex characters, for log lines. Not unique enough to authenticate anything.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = NodeIdParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let chars = text.chars().count();
        if chars != NODE_ID_LEN * 2 {
            return Err(NodeIdParseError::Length(chars));
        }
        if let Some((position, found)) =
            text.chars().enumerate().find(|(_, c)| !matches!(c, '0'..='9' | 'a'..='f'))
        {
            return Err(NodeIdParseError::Alphabet { found, position });
        }
        let mut bytes = [0u8; NODE_ID_LEN];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| NodeIdParseError::Length(chars))?;
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert_eq!("abc".parse::<NodeId>(), Err(NodeIdParseError::Length(3)));
        let mut upper = "a".repeat(64);
        upper.replace_range(10..11, "A");
        assert_eq!(upper.parse::<NodeId>(), Err(NodeIdParseError::Alphabet { found: 'A', position: 10 }));
        let mut z = "0".repeat(63);
        z.push('z');
        assert!(matches!(z.parse::<NodeId>(), Err(NodeIdParseError::Alphabet { found: 'z', position: 63 })));
    }

    proptest! {
        #[test]
        fn text_roundtrip(bytes in any::<[u8; 32]>()) {
            let id = NodeId::from_bytes(bytes);
            let text = id.to_string();
            prop_assert_eq!(text.len(), 64);
            prop_assert_eq!(text.parse::<NodeId>().ok(), Some(id));
            prop_assert!(text.starts_with(&id.short()));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,80}") {
            let _ = text.parse::<NodeId>();
        }
    }
}
