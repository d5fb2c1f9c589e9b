//! `validate manifest` and `push build`: reading a project's manifest,
//! packing its `process:` components from the HEAD commit, uploading what
//! the hub lacks, and recording the build.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use trellis_cas::BlobStore;
use trellis_model::manifest::{
    ComponentSource, DockerBuild, MANIFEST_FILE_NAMES, Manifest, parse_manifest,
};
use trellis_model::{Artifact, Build, BuildComponent, NewBuild};

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

/// Records a build of the project's HEAD commit. Everything in the build
/// comes from that commit (not from uncommitted files), so a build name
/// always means the same bits.
pub async fn push_build(
    client: &HubClient,
    project: &str,
    dir: &Path,
    verbose: bool,
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
    let export = tempfile::tempdir().context("creating a temporary directory")?;
    export_commit(&root, &commit, export.path())?;
    let project_dir = export.path().join(&prefix);
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
    if verbose && !dirty.is_empty() {
        eprintln!(
            "note: uncommitted changes are not part of the build; it is made from commit {}",
            crate::output::short(&commit)
        );
    }

    let staging = tempfile::tempdir().context("creating a temporary directory")?;
    let blobs = BlobStore::open(staging.path())?;
    let mut components = Vec::new();
    for component in &manifest.components {
        let artifact = match &component.source {
            ComponentSource::Docker(docker) => match &docker.build {
                DockerBuild::Image(image) => Artifact::Image {
                    reference: image.clone(),
                },
                DockerBuild::Dockerfile { .. } => bail!(
                    "component {:?} is built from a Dockerfile, which this version of Trellis cannot build yet; \
                     give it `docker.image` with an image your outposts have",
                    component.name
                ),
            },
            ComponentSource::Process(process) => {
                let source = project_dir.join(&process.path);
                if !source.is_dir() {
                    bail!(
                        "component {:?}: process.path {:?} is not a directory in commit {}",
                        component.name,
                        process.path,
                        crate::output::short(&commit)
                    );
                }
                let mut writer = blobs.writer()?;
                trellis_cas::pack_dir(&source, &mut writer)
                    .with_context(|| format!("packing component {:?}", component.name))?;
                let info = writer.finish(None)?;
                let digest = info.digest.to_string();
                if client.has_blob(&digest).await? {
                    if verbose {
                        println!(
                            "{}: package {} ({} bytes) already on the hub",
                            component.name,
                            crate::output::short(&digest),
                            info.size
                        );
                    }
                } else {
                    client.put_blob(&digest, &blobs.path(&info.digest)).await?;
                    if verbose {
                        println!(
                            "{}: uploaded package {} ({} bytes)",
                            component.name,
                            crate::output::short(&digest),
                            info.size
                        );
                    }
                }
                Artifact::Package {
                    digest,
                    size: info.size,
                }
            }
        };
        components.push(BuildComponent {
            name: component.name.clone(),
            artifact,
        });
    }
    let build = NewBuild {
        branch,
        commit,
        manifest_file: manifest_name,
        manifest: manifest_text,
        components,
    };
    let build: Build = client
        .post(
            &format!("/projects/{}/builds", crate::client::seg(project)),
            &build,
            "recording the build",
        )
        .await?;
    Ok(build)
}

/// Writes the tree of `commit` into `dest` (`git archive`, unpacked).
fn export_commit(repo: &Path, commit: &str, dest: &Path) -> anyhow::Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", commit])
        .output()
        .context("running git archive")?;
    if !out.status.success() {
        bail!(
            "git archive failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    tar::Archive::new(out.stdout.as_slice())
        .unpack(dest)
        .context("unpacking the commit's files")?;
    Ok(())
}
