//! Naming peers: what `send`, `ping` and `--accept-from` accept, and `qpeer alias`.
//!
//! A peer is given as, in this order of resolution:
//! 1. a full NodeId (64 hex characters);
//! 2. a local alias, kept in `HOME/aliases` (`qpeer alias NAME ID`);
//! 3. a name the tracker knows (a node that registered with `--name`), when exactly one
//!    registered node has it;
//! 4. a hex prefix of at least [`MIN_PREFIX`] characters of exactly one NodeId among the
//!    aliases and the nodes the tracker lists.
//!
//! A reference that resolves to nothing, or to more than one node, is a usage error
//! ([`UsageError`], exit 2) naming the candidates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use qpeer_certs::NodeId;
use qpeer_wire::tracker::PeerInfo;

/// Shortest id prefix accepted.
pub const MIN_PREFIX: usize = 6;

/// The aliases file in a home.
pub const ALIASES_FILE: &str = "aliases";

/// Exit code of a usage error.
pub const EXIT_USAGE: u8 = 2;

/// A mistake in what the user typed (exit code 2), as opposed to a failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(text: impl Into<String>) -> anyhow::Error {
    UsageError(text.into()).into()
}

/// The exit code for a command that failed with `error`: 2 for a usage error, else 1.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.chain().any(|cause| cause.downcast_ref::<UsageError>().is_some()) {
        EXIT_USAGE
    } else {
        1
    }
}

/// Local aliases: name → NodeId, kept in `HOME/aliases` (`NAME ID` per line, `#` comments).
#[derive(Debug, Default, Clone)]
pub struct Aliases {
    pub names: BTreeMap<String, NodeId>,
}

impl Aliases {
    pub fn path(home: &Path) -> PathBuf {
        home.join(ALIASES_FILE)
    }

    /// The aliases of `home` (none if the file does not exist).
    pub fn load(home: &Path) -> Result<Self> {
        let path = Self::path(home);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut names = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(id), None) = (words.next(), words.next(), words.next()) else {
                anyhow::bail!("{}:{}: expected `NAME ID`", path.display(), n + 1);
            };
            let id: NodeId = id.parse().with_context(|| format!("{}:{}", path.display(), n + 1))?;
            names.insert(name.to_string(), id);
        }
        Ok(Self { names })
    }

    /// Writes the aliases to `home` (replacing the file whole).
    pub fn save(&self, home: &Path) -> Result<()> {
        std::fs::create_dir_all(home).with_context(|| format!("cannot create {}", home.display()))?;
        let path = Self::path(home);
        let mut text = String::from("# qpeer aliases: NAME NODE_ID (edit with `qpeer alias`)\n");
        for (name, id) in &self.names {
            text.push_str(&format!("{name} {id}\n"));
        }
        let tmp = home.join(format!(".{ALIASES_FILE}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// The aliases of `id`.
    pub fn of(&self, id: &NodeId) -> Vec<&str> {
        self.names.iter().filter(|(_, v)| *v == id).map(|(k, _)| k.as_str()).collect()
    }
}

fn is_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether `name` may be an alias: it must not read as a NodeId or an id prefix.
fn check_alias_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(usage("an alias is 1 to 64 characters"));
    }
    if name.starts_with('-') || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#') {
        return Err(usage(format!(
            "alias {name:?}: no spaces, control characters or `#`, and no leading `-`"
        )));
    }
    if is_hex(name) && name.len() >= MIN_PREFIX {
        return Err(usage(format!(
            "alias {name:?} reads as a NodeId prefix ({MIN_PREFIX}+ hex characters); pick a name with a \
             non-hex letter"
        )));
    }
    Ok(())
}

/// `qpeer alias`: list, add (`NAME ID`, `--force` to replace), or remove.
pub fn alias_command(
    home: &Path,
    name: Option<String>,
    id: Option<String>,
    remove: Option<String>,
    force: bool,
) -> Result<()> {
    let mut aliases = Aliases::load(home)?;
    match (name, id, remove) {
        (None, None, None) => {
            if aliases.names.is_empty() {
                eprintln!("no aliases yet: qpeer alias NAME NODE_ID");
            }
            for (name, id) in &aliases.names {
                crate::progress::out_line(&format!("{name} {id}"));
            }
            Ok(())
        }
        (None, None, Some(name)) => {
            if aliases.names.remove(&name).is_none() {
                return Err(usage(format!("no alias {name:?} (qpeer alias lists them)")));
            }
            aliases.save(home)?;
            crate::progress::out_line(&format!("removed alias {name}"));
            Ok(())
        }
        (Some(name), Some(id), None) => {
            check_alias_name(&name)?;
            let id: NodeId = match id.parse() {
                Ok(id) => id,
                Err(_) => match aliases.names.get(&id) {
                    Some(id) => *id,
                    None => {
                        return Err(usage(format!(
                            "{id:?} is not a NodeId: give the full 64-hex id (`qpeer peers` lists them) \
                             or an existing alias"
                        )))
                    }
                },
            };
            match aliases.names.get(&name) {
                Some(old) if *old == id => {
                    crate::progress::out_line(&format!("alias {name} already names {id}"));
                    return Ok(());
                }
                Some(old) if !force => {
                    return Err(usage(format!(
                        "alias {name} already names {old}; use --force to point it at {id}"
                    )))
                }
                _ => {}
            }
            aliases.names.insert(name.clone(), id);
            aliases.save(home)?;
            crate::progress::out_line(&format!("alias {name} = {id}"));
            Ok(())
        }
        _ => Err(usage("use `qpeer alias`, `qpeer alias NAME ID` or `qpeer alias --remove NAME`")),
    }
}

/// What a reference can be resolved against.
pub struct Known<'a> {
    pub aliases: &'a Aliases,
    /// The tracker's directory; `None` when not asked (yet).
    pub registered: Option<&'a [PeerInfo]>,
}

/// How a reference resolved without or with the tracker's directory.
pub enum Resolved {
    Id(NodeId),
    /// The tracker's directory is needed.
    NeedsDirectory,
}

fn describe_candidate(id: &NodeId, known: &Known<'_>) -> String {
    let mut words = vec![id.to_string()];
    let aliases = known.aliases.of(id);
    if !aliases.is_empty() {
        words.push(format!("alias {}", aliases.join(", ")));
    }
    if let Some(name) = known
        .registered
        .and_then(|peers| peers.iter().find(|p| p.node_id == *id))
        .and_then(|p| p.name.as_deref())
    {
        words.push(format!("name {}", qpeer_wire::printable(name, 64)));
    }
    words.join(" ")
}

fn ambiguous(text: &str, what: &str, ids: &[NodeId], known: &Known<'_>) -> anyhow::Error {
    let list: Vec<String> = ids.iter().map(|id| format!("  {}", describe_candidate(id, known))).collect();
    usage(format!("{what} {text:?} matches {} nodes; give more of the id:\n{}", ids.len(), list.join("\n")))
}

/// Resolves `text` against `known` (see the module doc for the order).
pub fn resolve_in(text: &str, known: &Known<'_>) -> Result<Resolved> {
    let text = text.trim();
    if text.len() == 64 {
        if let Ok(id) = text.parse::<NodeId>() {
            return Ok(Resolved::Id(id));
        }
    }
    if let Some(id) = known.aliases.names.get(text) {
        return Ok(Resolved::Id(*id));
    }
    let Some(registered) = known.registered else {
        // A prefix that only an alias matches still needs the directory to be unambiguous.
        return Ok(Resolved::NeedsDirectory);
    };
    let mut named: Vec<NodeId> =
        registered.iter().filter(|p| p.name.as_deref() == Some(text)).map(|p| p.node_id).collect();
    named.sort_by_key(|id| id.to_string());
    named.dedup();
    match named.len() {
        1 => return Ok(Resolved::Id(named[0])),
        0 => {}
        _ => return Err(ambiguous(text, "name", &named, known)),
    }
    if !is_hex(text) {
        return Err(usage(format!(
            "no peer {text:?}: it is not a NodeId, a local alias (`qpeer alias`), a name registered with \
             the tracker (`qpeer peers`), or an id prefix"
        )));
    }
    if text.len() < MIN_PREFIX {
        return Err(usage(format!(
            "id prefix {text:?} is too short: give at least {MIN_PREFIX} hex characters of the NodeId"
        )));
    }
    let prefix = text.to_ascii_lowercase();
    let mut ids: Vec<NodeId> = registered
        .iter()
        .map(|p| p.node_id)
        .chain(known.aliases.names.values().copied())
        .filter(|id| id.to_string().starts_with(&prefix))
        .collect();
    ids.sort_by_key(|id| id.to_string());
    ids.dedup();
    match ids.len() {
        1 => Ok(Resolved::Id(ids[0])),
        0 => Err(usage(format!(
            "no node id starts with {text}: none of the {} nodes the tracker lists nor any alias \
             (`qpeer peers` lists them)",
            registered.len()
        ))),
        _ => Err(ambiguous(text, "id prefix", &ids, known)),
    }
}

/// Resolves `text` for a command run on `node`: aliases of its home, then the tracker.
pub async fn resolve(node: &qpeer_node::Node, text: &str) -> Result<NodeId> {
    let aliases = Aliases::load(node.home())?;
    if let Resolved::Id(id) = resolve_in(text, &Known { aliases: &aliases, registered: None })? {
        return Ok(id);
    }
    let registered = node.list_peers().await.context("cannot ask the tracker who is registered")?;
    match resolve_in(text, &Known { aliases: &aliases, registered: Some(&registered) })? {
        Resolved::Id(id) => Ok(id),
        // Only asked for without the directory; never here.
        Resolved::NeedsDirectory => {
            anyhow::bail!("cannot resolve {text:?}: the tracker's directory did not help")
        }
    }
}

/// `policy` with the peers named by `--accept-from` added (resolved on `node`: aliases, then
/// the tracker for names and prefixes).
pub async fn with_accept_from(
    policy: qpeer_node::transfer::receive::AcceptPolicy,
    node: &qpeer_node::Node,
    accept_from: &[String],
) -> Result<qpeer_node::transfer::receive::AcceptPolicy> {
    let mut ids = Vec::with_capacity(accept_from.len());
    for text in accept_from {
        ids.push(resolve(node, text).await.with_context(|| format!("--accept-from {text}"))?);
    }
    Ok(policy.allow_also(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: &str) -> NodeId {
        c.repeat(32).parse().expect("an id")
    }

    fn info(id: NodeId, name: Option<&str>) -> PeerInfo {
        PeerInfo { node_id: id, name: name.map(str::to_string), registered_at: 0 }
    }

    fn got(r: Result<Resolved>) -> NodeId {
        match r {
            Ok(Resolved::Id(id)) => id,
            Ok(Resolved::NeedsDirectory) => panic!("needs the directory"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn references_resolve_in_order_and_ambiguity_is_a_usage_error() {
        let (a, b) = (id("ab"), id("ac"));
        let mut aliases = Aliases::default();
        aliases.names.insert("bob".into(), b);
        let peers = [
            info(a, Some("alice")),
            info(b, None),
            info(id("12"), Some("twin")),
            info(id("13"), Some("twin")),
        ];
        let offline = Known { aliases: &aliases, registered: None };
        assert_eq!(got(resolve_in(&a.to_string(), &offline)), a);
        assert_eq!(got(resolve_in("bob", &offline)), b);
        assert!(matches!(resolve_in("abab", &offline), Ok(Resolved::NeedsDirectory)));
        let known = Known { aliases: &aliases, registered: Some(&peers) };
        assert_eq!(got(resolve_in("alice", &known)), a);
        assert_eq!(got(resolve_in("ababab", &known)), a);
        assert_eq!(got(resolve_in("ACACAC", &known)), b);
        for (text, says) in [
            ("abab", "too short"),
            ("a", "too short"),
            ("twin", "matches 2"),
            ("1", "too short"),
            ("1414141", "no node id starts"),
            ("nobody", "no peer"),
        ] {
            let e = resolve_in(text, &known).err().unwrap_or_else(|| panic!("{text} resolved"));
            assert_eq!(exit_code(&e), EXIT_USAGE);
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
        let peers = [info(a, None), info(id("a0"), None)];
        let known = Known { aliases: &aliases, registered: Some(&peers) };
        let e = resolve_in("a", &known).err().expect("too short");
        assert!(e.to_string().contains("at least 6"), "{e}");
    }

    #[test]
    fn aliases_are_kept_and_never_silently_replaced() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let home = dir.path();
        let (a, b) = (id("ab"), id("cd"));
        alias_command(home, Some("bob".into()), Some(a.to_string()), None, false)?;
        let e = alias_command(home, Some("bob".into()), Some(b.to_string()), None, false)
            .expect_err("no overwrite");
        assert_eq!(exit_code(&e), EXIT_USAGE);
        assert_eq!(Aliases::load(home)?.names["bob"], a);
        alias_command(home, Some("bob".into()), Some(b.to_string()), None, true)?;
        assert_eq!(Aliases::load(home)?.names["bob"], b);
        assert!(alias_command(home, Some("abcdef".into()), Some(b.to_string()), None, false).is_err());
        alias_command(home, None, None, Some("bob".into()), false)?;
        assert!(Aliases::load(home)?.names.is_empty());
        Ok(())
    }
}
