//! The path, link and mode rules that packing and unpacking both enforce.
//!
//! They are shared so that every package [`pack_dir`](super::pack_dir)
//! produces is one [`unpack`](super::unpack) accepts, and nothing else is.

use std::path::{Component, Path, PathBuf};

/// Mode of directories and of files with any execute bit.
pub(crate) const EXEC_MODE: u32 = 0o755;
/// Mode of all other files.
pub(crate) const FILE_MODE: u32 = 0o644;
/// Mode recorded for symlinks. Linux ignores it; 0o777 is what `lstat`
/// reports there and what other tar tools record.
pub(crate) const SYMLINK_MODE: u32 = 0o777;

/// The normalised mode of a regular file whose mode bits are `mode`: only
/// "is it executable" survives, so umasks and build tools' habits do not
/// change the package's digest, and setuid or world-writable bits never
/// travel.
pub(crate) fn file_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        EXEC_MODE
    } else {
        FILE_MODE
    }
}

/// Turns the path of an archive entry into a relative path made only of
/// plain names (`.` components dropped). Fails with the reason if the path
/// is absolute or has a `..` component. The result is empty for `.`.
pub(crate) fn entry_path(path: &Path) -> Result<PathBuf, &'static str> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => return Err("is an absolute path"),
            Component::ParentDir => return Err("has a `..` component"),
            Component::CurDir => {}
            Component::Normal(name) => out.push(name),
        }
    }
    Ok(out)
}

/// Checks that a symlink at `link` (a path from [`entry_path`], relative to
/// the package root) pointing to `target` stays inside the package.
///
/// Judging `..` by the text of the path is only sound if no `..` is applied
/// to a symlink: `s/..` is the parent of wherever `s` points, not `.`. So the
/// rule is: the target is relative, `..` appears only at its start, and
/// those leading `..` do not climb above the package root. Leading `..`
/// climb through real directories only, because unpacking also refuses
/// entries beneath a symlink; the names that follow descend, and any symlink
/// they pass through obeys the same rule. Returns the reason on failure, to
/// follow "which".
pub(crate) fn check_symlink_target(link: &Path, target: &Path) -> Result<(), String> {
    if target.as_os_str().is_empty() {
        return Err("is empty".to_owned());
    }
    let depth = link.components().count().saturating_sub(1);
    let mut ups = 0usize;
    let mut seen_name = false;
    for component in target.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                return Err("is an absolute path".to_owned());
            }
            Component::CurDir => {}
            Component::ParentDir if seen_name => {
                return Err("has `..` after a name (only leading `..` are allowed)".to_owned());
            }
            Component::ParentDir => ups += 1,
            Component::Normal(_) => seen_name = true,
        }
    }
    if ups > depth {
        return Err(format!(
            "climbs {ups} levels up from a link {depth} levels deep, out of the package"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(link: &str, target: &str) -> Result<(), String> {
        check_symlink_target(Path::new(link), Path::new(target))
    }

    #[test]
    fn modes_keep_only_the_exec_bit() {
        assert_eq!(file_mode(0o600), 0o644);
        assert_eq!(file_mode(0o666), 0o644);
        assert_eq!(file_mode(0o700), 0o755);
        assert_eq!(file_mode(0o4711), 0o755);
        assert_eq!(file_mode(0o001), 0o755);
    }

    #[test]
    fn entry_paths_are_normalised_or_refused() {
        assert_eq!(entry_path(Path::new("./a//b/")).unwrap(), Path::new("a/b"));
        assert_eq!(entry_path(Path::new(".")).unwrap(), Path::new(""));
        assert!(entry_path(Path::new("/etc/passwd")).is_err());
        assert!(entry_path(Path::new("a/../../b")).is_err());
        assert!(entry_path(Path::new("..")).is_err());
    }

    #[test]
    fn links_inside_the_package_are_accepted() {
        assert!(check("lib/libfoo.so", "libfoo.so.1").is_ok());
        assert!(check("bin/tool", "../lib/tool").is_ok());
        assert!(check("a/b/c", "../../x").is_ok());
        assert!(check("a/b", "./c/./d").is_ok());
        assert!(check("a/self", "..").is_ok());
        assert!(check("dot", ".").is_ok());
    }

    #[test]
    fn links_that_could_leave_the_package_are_refused() {
        assert!(check("x", "/etc/passwd").unwrap_err().contains("absolute"));
        assert!(
            check("x", "../y")
                .unwrap_err()
                .contains("out of the package")
        );
        assert!(check("a/b/c", "../../../y").is_err());
        assert!(check("x", "").unwrap_err().contains("empty"));
        // `s/..` depends on where `s` points, so it is refused even though
        // it looks harmless as text.
        assert!(check("a/x", "s/../y").unwrap_err().contains("after a name"));
        assert!(check("a/x", "s/..").is_err());
    }
}
