//! Checking offered paths before anything touches the disk. Pure functions.

use std::path::{Component, Path, PathBuf};

use qpeer_wire::transfer::{EntryKind, OfferEntry, MAX_PATH_LEN};

/// Why an offered path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path {0:?} is absolute")]
    Absolute(String),
    #[error("path {0:?} has an empty, `.` or `..` component")]
    Traversal(String),
    #[error("path {0:?} contains a NUL, control character or backslash")]
    BadCharacter(String),
    #[error("path of {0} bytes is longer than {MAX_PATH_LEN}")]
    TooLong(usize),
    #[error("path {0:?} has a component longer than 255 bytes")]
    ComponentTooLong(String),
    #[error("{path:?} is inside {link:?}, which is offered as a symbolic link")]
    UnderLink { path: String, link: String },
    #[error("path {0:?} appears twice in the offer")]
    Duplicate(String),
    #[error("{path:?} is inside {parent:?}, which is offered as a file")]
    UnderFile { path: String, parent: String },
}

/// Validates one relative path and returns it as a relative [`PathBuf`] of normal components.
pub fn sanitize(path: &str) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(path.len()));
    }
    if path.chars().any(|c| c == '\0' || c == '\\' || c.is_control()) {
        return Err(PathError::BadCharacter(path.to_string()));
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute(path.to_string()));
    }
    let mut out = PathBuf::new();
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(PathError::Traversal(path.to_string()));
        }
        if part.len() > 255 {
            return Err(PathError::ComponentTooLong(path.to_string()));
        }
        out.push(part);
    }
    // Belt and braces: what we built must be purely relative and normal.
    if !out.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(PathError::Traversal(path.to_string()));
    }
    Ok(out)
}

/// Validates a whole offer: every path, no duplicates, nothing below a file or a symlink.
/// Returns the sanitized paths in offer order. (Symlink targets are judged one by one, when
/// the link is created: [`check_link_target`].)
pub fn check_offer(entries: &[OfferEntry]) -> Result<Vec<PathBuf>, PathError> {
    #[derive(PartialEq)]
    enum Seen {
        File,
        Directory,
        Link,
    }
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let path = sanitize(&entry.path)?;
        let kind = match entry.kind {
            EntryKind::File { .. } => Seen::File,
            EntryKind::Directory => Seen::Directory,
            EntryKind::Symlink { .. } => Seen::Link,
        };
        if seen.insert(path.clone(), kind).is_some() {
            return Err(PathError::Duplicate(entry.path.clone()));
        }
        out.push(path);
    }
    for path in &out {
        for ancestor in path.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
            match seen.get(ancestor) {
                Some(Seen::File) => {
                    return Err(PathError::UnderFile {
                        path: path.display().to_string(),
                        parent: ancestor.display().to_string(),
                    })
                }
                Some(Seen::Link) => {
                    return Err(PathError::UnderLink {
                        path: path.display().to_string(),
                        link: ancestor.display().to_string(),
                    })
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Why a symlink is not created (receiver) or not sent (sender).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link's target is empty")]
    Empty,
    #[error("the link's target {0:?} is absolute")]
    Absolute(String),
    #[error("the link's target is {0} bytes, longer than {MAX_PATH_LEN}")]
    TooLong(usize),
    #[error("the link's target {0:?} contains a NUL or control character")]
    BadCharacter(String),
    #[error("the link's target {0:?} has `..` after a name (only leading `..` are accepted)")]
    InnerDotDot(String),
    #[error("the link's target {target:?} leads outside {root}")]
    Escapes { target: String, root: &'static str },
}

/// Whether a link at `link` (a sanitized relative path) pointing at `target` stays inside the
/// root, resolved from the link's own directory. `floor` is how many leading components of
/// `link` may not be climbed out of: 0 for the receive folder (the root is where `link` is
/// relative to), 1 for the sender's tree (the root is `link`'s first component).
///
/// The rule is lexical and strict, so that no other link on the way can change its meaning:
/// the target is relative, its `..` components all come first (a `..` after a name could
/// climb out of a directory that is itself a link), and there are no more of them than the
/// link's directory is deep below the root. `.` and empty components are ignored.
pub fn check_link_target(link: &Path, target: &str, floor: usize) -> Result<(), LinkError> {
    if target.is_empty() {
        return Err(LinkError::Empty);
    }
    if target.len() > MAX_PATH_LEN {
        return Err(LinkError::TooLong(target.len()));
    }
    if target.chars().any(|c| c == '\0' || c.is_control()) {
        return Err(LinkError::BadCharacter(target.to_string()));
    }
    if target.starts_with('/') {
        return Err(LinkError::Absolute(target.to_string()));
    }
    let depth = link.components().count().saturating_sub(1);
    let mut ups = 0usize;
    let mut named = false;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." if named => return Err(LinkError::InnerDotDot(target.to_string())),
            ".." => ups += 1,
            _ => named = true,
        }
    }
    let root = if floor == 0 { "the receive folder" } else { "the sent directory" };
    if ups + floor > depth {
        return Err(LinkError::Escapes { target: target.to_string(), root });
    }
    // A link that names only its ancestors (`..`, `.`) at the sender's tree root is still
    // inside: `ups + floor <= depth` covers it. A link at the receive folder's top level
    // pointing at `.` is the folder itself, which is inside too.
    Ok(())
}

/// `<path>.part`, where a file is written until it is verified.
pub fn part_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn file(path: &str) -> OfferEntry {
        OfferEntry { path: path.into(), kind: EntryKind::File { size: 1 }, meta: Default::default() }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in ["../x", "a/../../x", "/etc/x", "a//b", "./a", "a/.", "", "a\0b", "a\\..\\b", "a\nb"] {
            assert!(sanitize(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(sanitize("dir/sub/ü ñ.txt").expect("ok"), PathBuf::from("dir/sub/ü ñ.txt"));
        assert!(matches!(sanitize(&"a".repeat(300)), Err(PathError::ComponentTooLong(_))));
    }

    #[test]
    fn offers_with_duplicates_or_files_or_links_as_parents_are_refused() {
        let link = |path: &str| OfferEntry {
            path: path.into(),
            kind: EntryKind::Symlink { target: "x".into() },
            meta: Default::default(),
        };
        assert_eq!(check_offer(&[link("d/l")]).expect("a link alone is judged later").len(), 1);
        assert!(matches!(check_offer(&[link("l"), file("l/x")]), Err(PathError::UnderLink { .. })));
        assert!(matches!(check_offer(&[link("l"), file("l")]), Err(PathError::Duplicate(_))));
        assert!(matches!(check_offer(&[file("a"), file("a")]), Err(PathError::Duplicate(_))));
        assert!(matches!(check_offer(&[file("a"), file("a/b")]), Err(PathError::UnderFile { .. })));
        let dir = OfferEntry { path: "d".into(), kind: EntryKind::Directory, meta: Default::default() };
        assert_eq!(check_offer(&[dir, file("d/x")]).expect("ok").len(), 2);
    }

    #[test]
    fn link_targets_must_stay_inside_their_root() {
        let at = |p: &str| PathBuf::from(p);
        // Receive folder (floor 0).
        assert_eq!(check_link_target(&at("l"), "f", 0), Ok(()));
        assert_eq!(check_link_target(&at("l"), ".", 0), Ok(()));
        assert_eq!(check_link_target(&at("d/l"), "../f", 0), Ok(()));
        assert_eq!(check_link_target(&at("d/e/l"), "./../../x/y", 0), Ok(()));
        assert!(matches!(check_link_target(&at("l"), "../f", 0), Err(LinkError::Escapes { .. })));
        assert!(matches!(check_link_target(&at("d/l"), "../../f", 0), Err(LinkError::Escapes { .. })));
        assert!(matches!(check_link_target(&at("d/l"), "/etc/passwd", 0), Err(LinkError::Absolute(_))));
        assert!(matches!(check_link_target(&at("d/l"), "s/../f", 0), Err(LinkError::InnerDotDot(_))));
        assert!(matches!(check_link_target(&at("d/l"), "", 0), Err(LinkError::Empty)));
        assert!(matches!(check_link_target(&at("d/l"), "a\nb", 0), Err(LinkError::BadCharacter(_))));
        // Sender's tree (floor 1): `tree/l -> ../x` leaves the tree.
        assert_eq!(check_link_target(&at("tree/d/l"), "../f", 1), Ok(()));
        assert!(matches!(check_link_target(&at("tree/l"), "../f", 1), Err(LinkError::Escapes { .. })));
    }

    proptest! {
        #[test]
        fn sanitized_paths_never_escape(path in "[a./\\\\\0é-]{0,30}") {
            if let Ok(clean) = sanitize(&path) {
                prop_assert!(clean.is_relative());
                prop_assert!(clean.components().all(|c| matches!(c, Component::Normal(_))));
                let root = Path::new("/srv/out");
                prop_assert!(root.join(&clean).starts_with(root));
            }
        }

        #[test]
        fn accepted_link_targets_never_climb_out(
            link in "[ab]{1,2}(/[ab]{1,2}){0,3}",
            target in "(\\.\\.|\\.|[ab]|/){0,12}",
        ) {
            let link = PathBuf::from(link);
            if check_link_target(&link, &target, 0).is_ok() {
                // Resolve lexically from the link's directory: never above the root.
                let mut depth = link.components().count() as i64 - 1;
                for part in target.split('/') {
                    match part {
                        ".." => depth -= 1,
                        "" | "." => {}
                        _ => depth += 1,
                    }
                    prop_assert!(depth >= 0, "{target:?} from {link:?}");
                }
            }
        }
    }
}
