//! Making a component's directory for one spec: fetch and unpack the
//! package, write its files, link its volumes. All or nothing: the
//! `ready` marker is written last, and a spec directory without it is made
//! again from scratch.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use trellis_model::NameKind;
use trellis_model::manifest::StorageKind;

use super::layout::{
    ComponentDirs, READY, check_name, check_spec_hash, fs_error, private_dir, relative_in_root,
    remove_tree,
};
use super::sys;
use crate::runtime::artifacts::{ArtifactSource, parse_digest};
use crate::runtime::{ComponentPlan, RuntimeError, Workload};

/// Makes (or finds made) the root directory the component runs in.
pub(super) async fn prepare(
    dirs: &ComponentDirs,
    plan: &ComponentPlan,
    artifacts: &dyn ArtifactSource,
) -> Result<PathBuf, RuntimeError> {
    check_spec_hash(&plan.spec_hash)?;
    let Workload::Package { digest, .. } = &plan.workload else {
        return Err(RuntimeError::new(
            "invalid-plan",
            format!("component {:?} runs an image, not a package", plan.name),
        ));
    };
    let owner = owner(plan)?;
    dirs.ensure()?;
    let spec = dirs.spec(&plan.spec_hash);
    let root = dirs.root(&plan.spec_hash);
    if dirs.is_ready(&plan.spec_hash) {
        return Ok(root);
    }
    remove_tree(&spec).map_err(|e| fs_error("remove the incomplete", &spec, e))?;
    private_dir(&spec).map_err(|e| fs_error("create", &spec, e))?;

    // Usually delivered already (the deployer fetches every artifact of a
    // release before touching anything); then this only checks.
    let index_digest = parse_digest(digest)?;
    let index = artifacts.fetch(digest, &|_| {}).await?;
    let store = artifacts.store().clone();
    let to = root.clone();
    let unpacked = tokio::task::spawn_blocking(move || {
        let content = store.open_artifact(&index_digest, &index);
        trellis_cas::unpack(io::BufReader::with_capacity(1 << 20, content), &to)
            .map_err(io::Error::other)
    })
    .await
    .map_err(|e| RuntimeError::new("agent-internal", format!("unpacking stopped: {e}")))?;
    if let Err(e) = unpacked {
        let _ = remove_tree(&spec);
        let error = RuntimeError::new(
            "package-unpack-failed",
            format!(
                "could not unpack the package of component {:?}: {e}",
                plan.name
            ),
        );
        return Err(if e.to_string().contains("No space left") {
            error.with_hint("the disk is full; free space on the outpost")
        } else {
            error
        });
    }

    let dirs2 = dirs.clone();
    let plan2 = plan.clone();
    let root2 = root.clone();
    let made = tokio::task::spawn_blocking(move || furnish(&dirs2, &plan2, &root2, owner))
        .await
        .map_err(|e| RuntimeError::new("agent-internal", format!("preparing stopped: {e}")))?;
    if let Err(e) = made {
        let _ = remove_tree(&spec);
        return Err(e);
    }
    let ready = spec.join(READY);
    fs::write(&ready, b"").map_err(|e| fs_error("write", &ready, e))?;
    Ok(root)
}

/// The uid/gid the component runs as, when it is not the agent's own.
pub(super) fn owner(plan: &ComponentPlan) -> Result<Option<(u32, u32)>, RuntimeError> {
    let Some(user) = plan.user.as_deref() else {
        return Ok(None);
    };
    let (uid, gid) = sys::resolve_user(user).map_err(|e| {
        RuntimeError::new(
            "user-unknown",
            format!("component {:?} cannot run as {user:?}: {e}", plan.name),
        )
    })?;
    let me = rustix::process::geteuid().as_raw();
    if uid == me {
        return Ok(None);
    }
    if me != 0 {
        return Err(RuntimeError::new(
            "user-switch-impossible",
            format!(
                "component {:?} asks to run as {user:?}, but the agent runs as uid {me} and cannot switch users",
                plan.name
            ),
        )
        .with_hint("run the agent as root, or leave `user` out of the manifest"));
    }
    Ok(Some((uid, gid)))
}

/// Files and volumes into the unpacked root. Blocking.
fn furnish(
    dirs: &ComponentDirs,
    plan: &ComponentPlan,
    root: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(), RuntimeError> {
    let invalid = |what: String| RuntimeError::new("invalid-plan", what);
    for file in &plan.files {
        let rel = relative_in_root(&file.path).map_err(|e| invalid(format!("file {e}")))?;
        let path = root.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| fs_error("create", parent, e))?;
        }
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(invalid(format!(
                    "file {} of component {:?} would replace a directory of its package",
                    file.path, plan.name
                )));
            }
            Ok(_) => fs::remove_file(&path).map_err(|e| fs_error("replace", &path, e))?,
            Err(_) => {}
        }
        let mut out = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o444)
            .open(&path)
            .map_err(|e| fs_error("write", &path, e))?;
        out.write_all(file.content.as_bytes())
            .and_then(|()| out.sync_all())
            .map_err(|e| fs_error("write", &path, e))?;
    }

    let mut owned = vec![root.to_path_buf()];
    for volume in &plan.volumes {
        check_name(NameKind::Storage, &volume.name)?;
        let target = match volume.kind {
            StorageKind::Standard | StorageKind::Premium => dirs.volume(&volume.name),
            StorageKind::Temporary | StorageKind::Memory => {
                dirs.scratch(&plan.spec_hash, &volume.name)
            }
        };
        private_dir(&target).map_err(|e| fs_error("create", &target, e))?;
        owned.push(target.clone());
        let rel = relative_in_root(&volume.path).map_err(|e| invalid(format!("storage {e}")))?;
        let link = root.join(&rel);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(|e| fs_error("create", parent, e))?;
        }
        match fs::symlink_metadata(&link) {
            Ok(m) if m.is_dir() => {
                // An empty directory of the package is a mount point.
                fs::remove_dir(&link).map_err(|_| {
                    invalid(format!(
                        "storage {} of component {:?} is mounted at {}, where its package has a directory that is not empty",
                        volume.name, plan.name, volume.path
                    ))
                })?;
            }
            Ok(_) => fs::remove_file(&link).map_err(|e| fs_error("replace", &link, e))?,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&target, &link).map_err(|e| fs_error("link", &link, e))?;
    }

    if let Some((uid, gid)) = owner {
        // The component's own directory tree and volumes belong to its
        // user; the stage directory lets it pass (but not list).
        for path in owned {
            chown_tree(&path, uid, gid).map_err(|e| fs_error("change the owner of", &path, e))?;
        }
        let spec = dirs.spec(&plan.spec_hash);
        std::os::unix::fs::chown(&spec, Some(uid), Some(gid))
            .map_err(|e| fs_error("change the owner of", &spec, e))?;
        // Directories the agent keeps (pid files, logs) stay the agent's;
        // the way down to the component's root becomes passable.
        let project = dirs.stage_dir.parent().map(Path::to_path_buf);
        let runtime_root = project
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf);
        for dir in [runtime_root, project].into_iter().flatten().chain([
            dirs.stage_dir.clone(),
            dirs.stage_dir.join(super::layout::COMPONENTS),
            dirs.stage_dir.join(super::layout::VOLUMES),
            dirs.volumes(),
            dirs.dir.clone(),
        ]) {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
                .map_err(|e| fs_error("set the mode of", &dir, e))?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
