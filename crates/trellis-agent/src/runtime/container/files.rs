//! A component's `files`, written on the host under the stage's private
//! directory and bind-mounted read-only at their paths:
//! `<data>/container/<project>/<stage>/files/<component>/<spec-hash>/<path>`.
//!
//! Directories are created `0700` (owner: the agent), files `0644` so a
//! component running as another user can read its own file through the
//! mount; other users of the host cannot reach them, and another stage's
//! containers never get them mounted. Each spec hash has its own directory,
//! so a replaced container never sees the next release's files half-written.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::runtime::{PlannedFile, RuntimeError};

/// Creates `dir` and its missing parents with mode `0700`.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// The path of a file inside the component, relative, checked: absolute,
/// no `..`, not the root.
pub fn relative_target(path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Writes `files` under `dir` and returns `(host path, path inside)` of
/// each, for the mounts.
pub fn write_files(
    component: &str,
    dir: &Path,
    files: &[PlannedFile],
) -> Result<Vec<(PathBuf, String)>, RuntimeError> {
    let fail = |what: String| {
        RuntimeError::new(
            "files-write-failed",
            format!("the files of component {component:?} could not be prepared: {what}"),
        )
    };
    let mut mounts = Vec::with_capacity(files.len());
    for file in files {
        let Some(relative) = relative_target(&file.path) else {
            return Err(fail(format!(
                "{:?} is not an absolute path inside the container",
                file.path
            ))
            .with_hint("file paths in the manifest must be absolute, e.g. /etc/app/config.yaml"));
        };
        let host = dir.join(&relative);
        let write = || -> io::Result<()> {
            if let Some(parent) = host.parent() {
                create_private_dir(parent)?;
            }
            if fs::read(&host).is_ok_and(|now| now == file.content.as_bytes()) {
                return Ok(());
            }
            let tmp = host.with_extension("trellis-tmp");
            fs::write(&tmp, file.content.as_bytes())?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
            fs::rename(&tmp, &host)
        };
        write().map_err(|e| {
            fail(format!("{} could not be written at {}: {e}", file.path, host.display()))
                .with_hint("check that the agent's data directory is writable and not full; two files of a component may not be each other's directory")
        })?;
        mounts.push((host, file.path.clone()));
    }
    Ok(mounts)
}

/// Removes every spec directory of a component's files but `keep`.
pub fn prune(component_dir: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(component_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() != keep {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_stay_inside() {
        assert_eq!(
            relative_target("/www/index.html"),
            Some(PathBuf::from("www/index.html"))
        );
        assert_eq!(relative_target("/a/./b"), Some(PathBuf::from("a/b")));
        for bad in ["www/index.html", "/", "/a/../../etc/passwd", ""] {
            assert_eq!(relative_target(bad), None, "{bad}");
        }
    }

    #[test]
    fn writes_private_dirs_and_readable_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files/web/h1");
        let mounts = write_files(
            "web",
            &root,
            &[PlannedFile {
                path: "/www/index.html".into(),
                content: "hello".into(),
            }],
        )
        .unwrap();
        assert_eq!(mounts[0].1, "/www/index.html");
        assert_eq!(fs::read_to_string(&mounts[0].0).unwrap(), "hello");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root.join("www")), 0o700);
        assert_eq!(mode(&mounts[0].0), 0o644);
        let err = write_files(
            "web",
            &root,
            &[PlannedFile {
                path: "../x".into(),
                content: String::new(),
            }],
        )
        .unwrap_err();
        assert_eq!(err.code, "files-write-failed");
        prune(&dir.path().join("files/web"), "h2");
        assert!(!root.exists());
    }
}
