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
    #[error("{0:?} is a symbolic link; symlinks are not accepted")]
    Symlink(String),
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

/// Validates a whole offer: every path, no symlinks, no duplicates, nothing below a file.
/// Returns the sanitized paths in offer order.
pub fn check_offer(entries: &[OfferEntry]) -> Result<Vec<PathBuf>, PathError> {
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let path = sanitize(&entry.path)?;
        if let EntryKind::Symlink { .. } = entry.kind {
            return Err(PathError::Symlink(entry.path.clone()));
        }
        let is_file = matches!(entry.kind, EntryKind::File { .. });
        if seen.insert(path.clone(), is_file).is_some() {
            return Err(PathError::Duplicate(entry.path.clone()));
        }
        out.push(path);
    }
    for path in &out {
        for ancestor in path.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()) {
            if seen.get(ancestor) == Some(&true) {
                return Err(PathError::UnderFile {
                    path: path.display().to_string(),
                    parent: ancestor.display().to_string(),
                });
            }
        }
    }
    Ok(out)
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
        OfferEntry { path: path.into(), kind: EntryKind::File { size: 1 } }
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
    fn offers_with_symlinks_duplicates_or_files_as_parents_are_refused() {
        let link = OfferEntry { path: "d/l".into(), kind: EntryKind::Symlink { target: "/etc".into() } };
        assert!(matches!(check_offer(&[link]), Err(PathError::Symlink(_))));
        assert!(matches!(check_offer(&[file("a"), file("a")]), Err(PathError::Duplicate(_))));
        assert!(matches!(check_offer(&[file("a"), file("a/b")]), Err(PathError::UnderFile { .. })));
        let dir = OfferEntry { path: "d".into(), kind: EntryKind::Directory };
        assert_eq!(check_offer(&[dir, file("d/x")]).expect("ok").len(), 2);
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
    }
}
