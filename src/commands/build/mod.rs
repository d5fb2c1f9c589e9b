//! `validate manifest` and `push build`: reading a project's manifest,
//! making every component's artifact from the HEAD commit, uploading the
//! chunks the hub lacks, and recording the build.
//!
//! - `mod.rs`: the commands, the git side (HEAD's commit exported into the
//!   staging directory) and the order of the steps.
//! - `stage.rs`: artifacts made and chunked into a staging chunk store.
//! - `engine.rs`: the container engine's command line (Podman, Docker).
//! - `upload.rs`: the missing-chunks query, parallel uploads, the summary.

mod engine;
mod stage;
mod upload;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use trellis_model::manifest::{MANIFEST_FILE_NAMES, Manifest, parse_manifest};
use trellis_model::{Build, NewBuild};

use crate::cli::EngineKind;
use crate::client::HubClient;

/// Finds the manifest in a directory (or takes the file given).
fn manifest_path(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_owned());
    }
    if !path.is_dir() {
        bail!("{} does not exist", path.display());
    }
    MANIFEST_FILE_NAMES
        .iter()
        .map(|name| path.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{} holds no manifest; expected one of {}",
                path.display(),
                MANIFEST_FILE_NAMES.join(", ")
            )
        })
}

fn parse_reported(file: &str, text: &str) -> anyhow::Result<Manifest> {
    parse_manifest(text).map_err(|errors| {
        // `file:line:column: path: message`, the form editors and terminals
        // turn into a jump to the spot.
        let lines: Vec<String> = errors
            .0
            .iter()
            .map(|e| match e.path.as_str() {
                "" => format!("{file}:{}:{}: {}", e.line, e.column, e.message),
                path => format!("{file}:{}:{}: {path}: {}", e.line, e.column, e.message),
            })
            .collect();
        anyhow::anyhow!(
            "{file} is not a valid manifest ({} problem{}):\n{}",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" },
            lines.join("\n")
        )
    })
}

pub fn validate_manifest(path: &Path) -> anyhow::Result<()> {
    let file = manifest_path(path)?;
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let manifest = parse_reported(&file.display().to_string(), &text)?;
    println!(
        "{} is valid: {} component{} ({})",
        file.display(),
        manifest.components.len(),
        if manifest.components.len() == 1 {
            ""
        } else {
            "s"
        },
        manifest
            .components
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .context("running git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// How `push build` runs.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `--engine` / `TRELLIS_ENGINE`; the first of podman, docker on PATH
    /// when `None`.
    pub engine: Option<EngineKind>,
    /// `--pull`: pull `docker.image` images the local engine lacks.
    pub pull: bool,
    /// Narrate on stderr, show upload progress, and print a line per
    /// component and the upload summary on stdout.
    pub verbose: bool,
}

/// Records a build of the project's HEAD commit, with the engine found on
/// PATH and no pulling. See [`push_build_with`].
pub async fn push_build(
    client: &HubClient,
    project: &str,
    dir: &Path,
    verbose: bool,
) -> anyhow::Result<Build> {
    let options = PushOptions {
        verbose,
        ..PushOptions::default()
    };
    push_build_with(client, project, dir, &options).await
}

/// Records a build of the project's HEAD commit. Everything in the build
/// comes from that commit (not from uncommitted files), so a build name
/// always means the same bits: each component's artifact is made from it
/// and chunked in a staging directory (`stage.rs`), the chunks the hub
/// lacks are uploaded (`upload.rs`), and only then is the build recorded —
/// so a push that fails or is interrupted records nothing, and pushing
/// again sends only what is still missing.
pub async fn push_build_with(
    client: &HubClient,
    project: &str,
    dir: &Path,
    options: &PushOptions,
) -> anyhow::Result<Build> {
    let root = git(dir, &["rev-parse", "--show-toplevel"]).map_err(|_| {
        anyhow::anyhow!(
            "{} is not in a git work tree; builds are made from a commit: run `git init`, add the project's files and commit",
            dir.display()
        )
    })?;
    let root = PathBuf::from(root);
    let commit = git(&root, &["rev-parse", "--verify", "HEAD"]).map_err(|_| {
        anyhow::anyhow!(
            "the repository at {} has no commit yet; commit the project first",
            root.display()
        )
    })?;
    let branch = match git(&root, &["symbolic-ref", "--short", "-q", "HEAD"]) {
        Ok(b) if !b.is_empty() => b,
        _ => "detached".to_owned(),
    };
    // The project may live in a subdirectory of the repository.
    let prefix = git(dir, &["rev-parse", "--show-prefix"])?;
    // One temporary directory holds the exported commit and the staged
    // chunks; TMPDIR says where.
    let staging = tempfile::Builder::new()
        .prefix("trellis-push-")
        .tempdir()
        .context("creating a staging directory (TMPDIR says where)")?;
    let staging_path = staging.path().to_owned();
    let export = staging_path.join("source");
    std::fs::create_dir(&export)
        .with_context(|| format!("creating {}", export.display()))
        .and_then(|()| export_commit(&root, &commit, &export))
        .map_err(|e| stage::staging_error(e, &staging_path))?;
    let project_dir = export.join(&prefix);
    let manifest_file = manifest_path(&project_dir).map_err(|_| {
        anyhow::anyhow!(
            "commit {} has no manifest in {}; expected one of {} (is it committed?)",
            crate::output::short(&commit),
            if prefix.is_empty() {
                "the repository's root".to_owned()
            } else {
                prefix.clone()
            },
            MANIFEST_FILE_NAMES.join(", ")
        )
    })?;
    let manifest_name = manifest_file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("trellis.yaml")
        .to_owned();
    let manifest_text = std::fs::read_to_string(&manifest_file).context("reading the manifest")?;
    let manifest = parse_reported(&manifest_name, &manifest_text)?;
    let dirty = git(&root, &["status", "--porcelain"]).unwrap_or_default();
    if options.verbose && !dirty.is_empty() {
        eprintln!(
            "note: uncommitted changes are not part of the build; it is made from commit {}",
            crate::output::short(&commit)
        );
    }

    let store = stage::open_store(&staging_path)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let job = stage::Job {
        project: project.to_owned(),
        commit: commit.clone(),
        manifest,
        manifest_name: manifest_name.clone(),
        export_root: export.clone(),
        project_dir,
        work_dir: root.join(&prefix),
        engine: options.engine,
        pull: options.pull,
        verbose: options.verbose,
        cancel: Arc::clone(&cancel),
    };
    let mut staging_task = tokio::task::spawn_blocking({
        let store = store.clone();
        let staging_path = staging_path.clone();
        move || {
            stage::stage(&job, &store, &staging_path)
                .map_err(|e| stage::staging_error(e, &staging_path))
        }
    });
    let staged = tokio::select! {
        joined = &mut staging_task => joined.context("preparing the build's artifacts")??,
        _ = tokio::signal::ctrl_c() => {
            // Stop at the next chunk, and let the staging directory go only
            // once nothing writes to it any more.
            cancel.store(true, Ordering::Relaxed);
            let _ = staging_task.await;
            bail!("{INTERRUPTED}");
        }
    };
    if options.verbose {
        for line in &staged.report {
            println!("{line}");
        }
    }

    let mut chunks = upload::ChunkList::default();
    for artifact in &staged.artifacts {
        chunks.add_artifact(
            &store,
            &artifact.component,
            &artifact.put.index_digest,
            stage::chunk_digests(&artifact.put),
        )?;
    }
    let summary = tokio::select! {
        summary = upload::upload(client, &store, &chunks, options.verbose) => summary?,
        _ = tokio::signal::ctrl_c() => bail!("{INTERRUPTED}"),
    };
    if options.verbose {
        println!("{}", summary.line());
    }

    let build = NewBuild {
        branch,
        commit,
        manifest_file: manifest_name,
        manifest: manifest_text,
        components: staged.components,
    };
    let build: Build = client
        .post(
            &format!("/projects/{}/builds", crate::client::seg(project)),
            &build,
            "recording the build",
        )
        .await?;
    drop(staging);
    Ok(build)
}

const INTERRUPTED: &str = "interrupted; no build was recorded. Chunks already uploaded stay on \
    the hub, so pushing again sends only what is still missing";

/// Writes the tree of `commit` into `dest` (`git archive`, unpacked as it
/// streams).
fn export_commit(repo: &Path, commit: &str, dest: &Path) -> anyhow::Result<()> {
    let mut child = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", commit])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut archive = tar::Archive::new(stdout);
    let unpacked = archive.unpack(dest);
    // git pads its output past the end-of-archive blocks, where unpacking
    // stops: read the rest, or git may die of a closed pipe (SIGPIPE, no
    // message) depending on timing.
    if unpacked.is_ok() {
        let _ = std::io::copy(&mut archive.into_inner(), &mut std::io::sink());
    } else {
        drop(archive);
    }
    // The pipe is closed or drained: git cannot block on it.
    let out = child.wait_with_output().context("running git archive")?;
    // When unpacking failed, git failed only because the pipe closed.
    unpacked.with_context(|| format!("unpacking the commit's files into {}", dest.display()))?;
    if !out.status.success() {
        bail!(
            "git archive failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
