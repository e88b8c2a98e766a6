//! The walk of the source: depth first, names sorted (the same tree gives the same
//! archive), symlinks never followed, under the contract's `shallow` policy: a symlink
//! that resolves inside the source is kept as a symlink (an absolute one made relative,
//! so it restores anywhere), one that leaves it is left out with `SYMLINK_EXTERNAL`.
//!
//! The staging dir is fenced off: with the source at `/`, the archive must not read
//! itself, nor other jobs' artifacts. An explicit stack, not recursion: a hostile, very deep tree cannot overflow ours.

use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::failure::Failure;

pub enum Item {
    Directory,
    File,
    /// The target as it will be stored.
    Symlink(OsString),
    /// Left out, with the event that says why.
    Skipped {
        code: &'static str,
        severity: &'static str,
        message: String,
    },
}

pub struct Entry {
    /// Relative to the source root.
    pub relative: PathBuf,
    pub meta: Option<Metadata>,
    pub item: Item,
}

fn list(dir: &Path) -> io::Result<std::vec::IntoIter<OsString>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names.into_iter())
}

fn skipped(
    relative: PathBuf,
    code: &'static str,
    severity: &'static str,
    message: String,
) -> Entry {
    Entry { relative, meta: None, item: Item::Skipped { code, severity, message } }
}

/// Visit every entry under `root` (not `root` itself); `visit` may stop the walk.
/// Directories whose (device, inode) is in `fenced` are left out, with an info event.
pub fn walk(
    root: &Path,
    fenced: &[(u64, u64)],
    visit: &mut dyn FnMut(Entry) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let real_root = fs::canonicalize(root)
        .map_err(|e| Failure::io(&format!("source {}", root.display()), &e))?;
    let top = list(root).map_err(|e| Failure::io(&format!("source {}", root.display()), &e))?;
    let mut stack: Vec<(PathBuf, std::vec::IntoIter<OsString>)> = vec![(PathBuf::new(), top)];
    loop {
        let (relative, absolute) = match stack.last_mut() {
            None => return Ok(()),
            Some((dir, names)) => match names.next() {
                None => {
                    stack.pop();
                    continue;
                }
                Some(name) => {
                    let relative = dir.join(&name);
                    let absolute = root.join(&relative);
                    (relative, absolute)
                }
            },
        };
        let meta = match fs::symlink_metadata(&absolute) {
            Ok(meta) => meta,
            Err(e) => {
                let (code, message) = describe(&e, "cannot stat");
                visit(skipped(relative, code, "warn", message))?;
                continue;
            }
        };
        let kind = meta.file_type();
        if kind.is_dir() && fenced.contains(&(meta.dev(), meta.ino())) {
            let message = String::from("the staging dir is not archived into itself");
            visit(skipped(relative, "STAGING_EXCLUDED", "info", message))?;
        } else if kind.is_dir() {
            visit(Entry { relative: relative.clone(), meta: Some(meta), item: Item::Directory })?;
            match list(&absolute) {
                Ok(names) => stack.push((relative, names)),
                Err(e) => {
                    let (code, message) = describe(&e, "directory not readable");
                    visit(skipped(relative, code, "warn", message))?;
                }
            }
        } else if kind.is_file() {
            visit(Entry { relative, meta: Some(meta), item: Item::File })?;
        } else if kind.is_symlink() {
            let item = symlink(&real_root, root, &relative);
            visit(Entry { relative, meta: Some(meta), item })?;
        } else {
            let message = String::from("special file (device, FIFO or socket) left out");
            visit(skipped(relative, "ANOMALY_DETECTED", "warn", message))?;
        }
    }
}

/// The event code and message for an entry that could not be read.
pub fn describe(error: &io::Error, what: &str) -> (&'static str, String) {
    let code = match error.kind() {
        io::ErrorKind::NotFound => "FILE_VANISHED",
        io::ErrorKind::PermissionDenied => "PERMISSION_DENIED",
        _ => "ANOMALY_DETECTED", // a name too long for the kernel, an I/O error...
    };
    (code, format!("{}: {}", what, error))
}

fn symlink(real_root: &Path, root: &Path, relative: &Path) -> Item {
    let absolute = root.join(relative);
    let target = match fs::read_link(&absolute) {
        Ok(target) => target,
        Err(e) => {
            let (code, message) = describe(&e, "cannot read the symlink");
            return Item::Skipped { code, severity: "warn", message };
        }
    };
    let shown = target.display().to_string();
    match fs::canonicalize(&absolute) {
        Ok(resolved) if resolved.starts_with(real_root) => {}
        Ok(_) => {
            return Item::Skipped {
                code: "SYMLINK_EXTERNAL",
                severity: "warn",
                message: format!("symlink to {} leaves the source", shown),
            }
        }
        Err(_) => {
            // dangling or a loop: kept only when it names a place inside the source
            if target.is_absolute()
                || lexical(relative.parent().unwrap_or(Path::new("")), &target).is_none()
            {
                return Item::Skipped {
                    code: "SYMLINK_SKIPPED",
                    severity: "info",
                    message: format!("symlink to {} is dangling or a loop", shown),
                };
            }
        }
    }
    if !target.is_absolute() {
        return Item::Symlink(target.into_os_string());
    }
    // inside, but absolute: stored relative to the link's directory
    let under = target.strip_prefix(root).or_else(|_| target.strip_prefix(real_root));
    match under {
        Ok(inner) => {
            Item::Symlink(relative_from(relative.parent().unwrap_or(Path::new("")), inner))
        }
        Err(_) => Item::Skipped {
            code: "SYMLINK_EXTERNAL",
            severity: "warn",
            message: format!("absolute symlink to {} is not under the source path", shown),
        },
    }
}

/// `dir/target` normalised without touching the disk; None when it climbs out.
fn lexical(dir: &Path, target: &Path) -> Option<Vec<OsString>> {
    let mut parts: Vec<OsString> = dir.components().map(|c| c.as_os_str().to_os_string()).collect();
    for component in target.components() {
        match component {
            Component::Normal(name) => parts.push(name.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts)
}

/// The relative path from directory `from` to `to`, both relative to the root.
fn relative_from(from: &Path, to: &Path) -> OsString {
    let from: Vec<&OsStr> = from.components().map(|c| c.as_os_str()).collect();
    let to_parts: Vec<&OsStr> = to.components().map(|c| c.as_os_str()).collect();
    let common = from.iter().zip(to_parts.iter()).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out.into_os_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_refuses_to_climb_out() {
        assert!(lexical(Path::new("a"), Path::new("../b")).is_some());
        assert!(lexical(Path::new("a"), Path::new("../../b")).is_none());
        assert!(lexical(Path::new(""), Path::new("/etc")).is_none());
    }

    #[test]
    fn absolute_targets_become_relative() {
        assert_eq!(relative_from(Path::new("a/b"), Path::new("a/c/f")), OsString::from("../c/f"));
        assert_eq!(relative_from(Path::new(""), Path::new("f")), OsString::from("f"));
    }
}
