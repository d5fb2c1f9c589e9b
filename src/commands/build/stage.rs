//! Staging a build: every component's artifact made from the exported
//! commit and cut into chunks in a staging [`ChunkStore`] in a temporary
//! directory, before anything is uploaded.
//!
//! - `process:` components: the directory packed ([`trellis_cas::pack_dir`])
//!   into a file, then chunked as a package.
//! - `docker.file` components: the image built by the local engine from the
//!   commit's Dockerfile and context, tagged
//!   `trellis.local/<project>/<component>:<commit, 12 hex>`.
//! - `docker.image` components: the image the local engine has (pulled
//!   first only with `--pull`).
//!
//! Images are then saved as a `docker save` archive and chunked as an
//! image; the archive file is removed once chunked, so the staging
//! directory holds each artifact once, compressed.
//!
//! Everything here blocks (engine commands, packing, hashing); it runs on a
//! blocking thread and stops at the next chunk once `cancel` is set.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::{Component as PathPart, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use trellis_cas::{ArtifactKind, ChunkStore, Digest, Durability, PutArtifact};
use trellis_model::manifest::{Arch, ComponentSource, DockerBuild, DockerSource, Manifest};
use trellis_model::{Artifact, BuildComponent, ImageArchive, PlatformImage};

use super::engine::{Engine, Failed};
use crate::cli::EngineKind;
use crate::output::{bytes, short};

/// What `stage` is given.
pub struct Job {
    pub project: String,
    pub commit: String,
    pub manifest: Manifest,
    /// The manifest's file name, for messages (`trellis.yaml`).
    pub manifest_name: String,
    /// The exported commit (the repository's root).
    pub export_root: PathBuf,
    /// The project's directory in the export (the root, or a subdirectory).
    pub project_dir: PathBuf,
    /// The project's directory in the user's work tree, to tell a file that
    /// is not committed from one that does not exist.
    pub work_dir: PathBuf,
    pub engine: Option<EngineKind>,
    pub pull: bool,
    /// Narrate on stderr (and stream the engine's output there).
    pub verbose: bool,
    pub cancel: Arc<AtomicBool>,
}

/// One staged artifact.
pub struct StagedArtifact {
    pub component: String,
    pub put: PutArtifact,
}

/// What `stage` made.
pub struct Staged {
    pub components: Vec<BuildComponent>,
    pub artifacts: Vec<StagedArtifact>,
    /// One line per component for the user, e.g.
    /// `web: image trellis.local/shop/web:0123456789ab (sha256:…), 3.1 MiB`.
    pub report: Vec<String>,
}

/// The reference a `docker.file` component's image is tagged with.
pub fn built_reference(project: &str, component: &str, commit: &str) -> String {
    format!("trellis.local/{project}/{component}:{}", short(commit)).to_ascii_lowercase()
}

/// Makes every component's artifact in `store`; see the module docs.
pub fn stage(job: &Job, store: &ChunkStore, staging: &Path) -> anyhow::Result<Staged> {
    let containers: Vec<&str> = job
        .manifest
        .components
        .iter()
        .filter(|c| matches!(c.source, ComponentSource::Docker(_)))
        .map(|c| c.name.as_str())
        .collect();
    let engine = if containers.is_empty() {
        None
    } else {
        Some(Engine::find(
            job.engine,
            &format!("docker: in {}", containers.join(", ")),
        )?)
    };
    let mut staged = Staged {
        components: Vec::new(),
        artifacts: Vec::new(),
        report: Vec::new(),
    };
    // An image named by several components is saved once.
    let mut saved = HashMap::new();
    for component in &job.manifest.components {
        check_cancel(&job.cancel)?;
        let name = component.name.as_str();
        let (artifact, puts, line) = match &component.source {
            ComponentSource::Process(process) => {
                let (put, line) = stage_package(job, store, staging, name, &process.path)?;
                let artifact = Artifact::Package {
                    digest: put.index_digest.as_hex(),
                    size: put.index.size,
                };
                (artifact, vec![put], line)
            }
            ComponentSource::Docker(docker) => {
                let engine = engine
                    .as_ref()
                    .expect("found above for container components");
                stage_docker(job, engine, store, staging, &mut saved, name, docker)?
            }
        };
        staged.components.push(BuildComponent {
            name: name.to_owned(),
            artifact,
        });
        staged
            .artifacts
            .extend(puts.into_iter().map(|put| StagedArtifact {
                component: name.to_owned(),
                put,
            }));
        staged.report.push(line);
    }
    Ok(staged)
}

/// Makes a container component's image — one per listed architecture when
/// the manifest lists `docker.platform` — and chunks its archive.
fn stage_docker(
    job: &Job,
    engine: &Engine,
    store: &ChunkStore,
    staging: &Path,
    saved: &mut HashMap<(String, Option<Arch>), (ImageArchive, PutArtifact)>,
    name: &str,
    docker: &DockerSource,
) -> anyhow::Result<(Artifact, Vec<PutArtifact>, String)> {
    let base = match &docker.build {
        DockerBuild::Image(image) => image.clone(),
        DockerBuild::Dockerfile { .. } => built_reference(&job.project, name, &job.commit),
    };
    if docker.platforms.is_empty() {
        let reference = make_image(job, engine, name, docker, &base, None)?;
        let (archive, put) = save_once(job, engine, store, staging, saved, name, &reference, None)?;
        let line = format!(
            "{name}: image {reference} ({}, archive {})",
            archive.image_id,
            bytes(archive.size)
        );
        let artifact = Artifact::Image {
            reference,
            archive: Some(archive),
            platforms: Vec::new(),
        };
        return Ok((artifact, vec![put], line));
    }
    let mut platforms = Vec::with_capacity(docker.platforms.len());
    let mut puts = Vec::with_capacity(docker.platforms.len());
    let mut each = Vec::with_capacity(docker.platforms.len());
    for &arch in &docker.platforms {
        check_cancel(&job.cancel)?;
        let tagged = match &docker.build {
            // One tag per architecture, so the builds do not replace each other.
            DockerBuild::Dockerfile { .. } => format!("{base}-{arch}"),
            DockerBuild::Image(_) => base.clone(),
        };
        let reference = make_image(job, engine, name, docker, &tagged, Some(arch))?;
        let (archive, put) = save_once(
            job,
            engine,
            store,
            staging,
            saved,
            name,
            &reference,
            Some(arch),
        )?;
        each.push(format!(
            "{arch} ({}, archive {})",
            archive.image_id,
            bytes(archive.size)
        ));
        platforms.push(PlatformImage {
            arch,
            reference,
            archive: Some(archive),
        });
        puts.push(put);
    }
    let line = format!("{name}: image {base} for {}", each.join(", "));
    let artifact = Artifact::Image {
        reference: base,
        archive: None,
        platforms,
    };
    Ok((artifact, puts, line))
}

/// Builds (`docker.file`) or finds (`docker.image`) the image of one
/// architecture (`None`: the engine's own), and returns its reference.
fn make_image(
    job: &Job,
    engine: &Engine,
    name: &str,
    docker: &DockerSource,
    reference: &str,
    arch: Option<Arch>,
) -> anyhow::Result<String> {
    let for_arch = arch.map(|a| format!(" for {a}")).unwrap_or_default();
    match &docker.build {
        DockerBuild::Image(image) => {
            ensure_image(job, engine, name, image, arch)?;
            Ok(image.clone())
        }
        DockerBuild::Dockerfile {
            file,
            context,
            args,
        } => {
            let dockerfile = committed_path(job, name, "docker.file", file, false)?;
            let context = committed_path(
                job,
                name,
                "docker.build-context",
                context.as_deref().unwrap_or("."),
                true,
            )?;
            if job.verbose {
                eprintln!(
                    "{name}: building {reference}{for_arch} from {file} with {}",
                    engine.name()
                );
            }
            let build = |no_cache| {
                run_build(
                    job,
                    engine,
                    name,
                    file,
                    &dockerfile,
                    &context,
                    reference,
                    args,
                    arch,
                    no_cache,
                )
            };
            build(false)?;
            let Some(arch) = arch else {
                return Ok(reference.to_owned());
            };
            // Podman 4 and Docker's classic builder reuse cached layers of a
            // `FROM scratch` build made for another architecture, and the
            // image then claims that architecture: build once more without
            // the cache when the image is not of the one asked for.
            if engine.image_arch(reference)?.as_deref() != Some(arch.as_str()) {
                build(true)?;
                let built = engine.image_arch(reference)?;
                if built.as_deref() != Some(arch.as_str()) {
                    bail!(
                        "component {name:?}: {engine} built {reference} for {}, though asked for \
                         {arch} (--platform {}); check that this {engine} can build for other \
                         architectures. Nothing was recorded on the hub.",
                        built.as_deref().unwrap_or("an unknown architecture"),
                        arch.platform(),
                        engine = engine.name(),
                    );
                }
            }
            Ok(reference.to_owned())
        }
    }
}

/// One `build` of the engine; a failure is the user's error, with the
/// engine's last lines.
#[allow(clippy::too_many_arguments)]
fn run_build(
    job: &Job,
    engine: &Engine,
    name: &str,
    file: &str,
    dockerfile: &Path,
    context: &Path,
    reference: &str,
    args: &std::collections::BTreeMap<String, String>,
    arch: Option<Arch>,
    no_cache: bool,
) -> anyhow::Result<()> {
    let platform = arch.map(Arch::platform);
    let for_arch = arch.map(|a| format!(" for {a}")).unwrap_or_default();
    if let Err(failed) = engine.build(
        dockerfile,
        context,
        reference,
        args,
        platform.as_deref(),
        no_cache,
        job.verbose,
    )? {
        check_cancel(&job.cancel)?;
        bail!(
            "component {name:?}: building its image{for_arch} from {file} with {engine} \
             failed ({status}){shown}; the last lines of its output:\n{tail}\n\
             Fix the Dockerfile or the files it uses, commit, and push again. \
             Nothing was recorded on the hub.",
            engine = engine.name(),
            status = failed.status,
            shown = if job.verbose { ", output above" } else { "" },
            tail = failed.quoted(),
        );
    }
    Ok(())
}

/// Saves and chunks an image once per build, however many components name
/// it.
#[allow(clippy::too_many_arguments)]
fn save_once(
    job: &Job,
    engine: &Engine,
    store: &ChunkStore,
    staging: &Path,
    saved: &mut HashMap<(String, Option<Arch>), (ImageArchive, PutArtifact)>,
    name: &str,
    reference: &str,
    arch: Option<Arch>,
) -> anyhow::Result<(ImageArchive, PutArtifact)> {
    let key = (reference.to_owned(), arch);
    if let Some(done) = saved.get(&key) {
        return Ok(done.clone());
    }
    let done = stage_image(job, engine, store, staging, name, reference, arch)?;
    saved.insert(key, done.clone());
    Ok(done)
}

/// Packs a `process:` directory and chunks the package.
fn stage_package(
    job: &Job,
    store: &ChunkStore,
    staging: &Path,
    name: &str,
    path: &str,
) -> anyhow::Result<(PutArtifact, String)> {
    let source = job.project_dir.join(path);
    if !source.is_dir() {
        bail!(
            "component {name:?}: process.path {path:?} is not a directory in commit {}; commit \
             the directory, or fix process.path in {}",
            short(&job.commit),
            job.manifest_name
        );
    }
    if job.verbose {
        eprintln!("{name}: packing {path}");
    }
    let package = staging.join(format!("{name}.package.tar"));
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&package)
        .with_context(|| format!("creating {}", package.display()))?;
    trellis_cas::pack_dir(&source, &mut file)
        .with_context(|| format!("component {name:?}: packing {path}"))?;
    file.rewind()
        .with_context(|| format!("reading {}", package.display()))?;
    let put = chunk(job, store, ArtifactKind::Package, file)
        .with_context(|| format!("component {name:?}: chunking its package"))?;
    let _ = std::fs::remove_file(&package);
    let line = format!(
        "{name}: package {} ({})",
        short(&put.index_digest.as_hex()),
        bytes(put.index.size)
    );
    Ok((put, line))
}

/// Checks that the engine has `image` (of `arch`, when given), pulling it
/// with `--pull`.
fn ensure_image(
    job: &Job,
    engine: &Engine,
    name: &str,
    image: &str,
    arch: Option<Arch>,
) -> anyhow::Result<()> {
    let platform = arch.map(Arch::platform);
    let platform = platform.as_deref();
    match (engine.image_id(image)?, arch) {
        (Ok(_), None) => return Ok(()),
        // The engine keeps one architecture per tag: without --pull the
        // local image must be of the one asked for, and with it every
        // listed architecture is pulled in turn.
        (Ok(_), Some(arch)) if !job.pull => {
            let local = engine.image_arch(image)?;
            if local.as_deref() == Some(arch.as_str()) {
                return Ok(());
            }
            bail!(
                "component {name:?}: docker.platform lists {arch}, but the local {engine}'s \
                 {image:?} is for {}; pull every listed architecture with `trellis push build \
                 --pull`. Nothing was recorded on the hub.",
                local.as_deref().unwrap_or("an unknown architecture"),
                engine = engine.name(),
            );
        }
        (Ok(_), Some(_)) => {}
        (Err(absent), _) if !job.pull => bail!(
            "component {name:?}: the local {engine} has no image {image:?} (docker.image in {}); \
             {engine} said:\n{}\nPull it with `trellis push build --pull` (or `{engine} pull \
             {image}`), or build it locally first. Nothing was recorded on the hub.",
            job.manifest_name,
            absent.quoted(),
            engine = engine.name(),
        ),
        (Err(_), _) => {}
    }
    if job.verbose {
        let for_arch = arch.map(|a| format!(" for {a}")).unwrap_or_default();
        eprintln!("{name}: pulling {image}{for_arch} with {}", engine.name());
    }
    if let Err(failed) = engine.pull(image, platform, job.verbose)? {
        check_cancel(&job.cancel)?;
        bail!(
            "component {name:?}: pulling {image:?} with {engine} failed ({}); the last lines of \
             its output:\n{}\nCheck the image's name in {} and that its registry is reachable \
             from here (and logged in to, if it needs that), then push again. Nothing was \
             recorded on the hub.",
            failed.status,
            failed.quoted(),
            job.manifest_name,
            engine = engine.name(),
        );
    }
    Ok(())
}

/// Saves the image into the staging directory and chunks the archive.
fn stage_image(
    job: &Job,
    engine: &Engine,
    store: &ChunkStore,
    staging: &Path,
    name: &str,
    reference: &str,
    arch: Option<Arch>,
) -> anyhow::Result<(ImageArchive, PutArtifact)> {
    let image_id = match engine.image_id(reference)? {
        Ok(id) => id,
        Err(failed) => bail!(
            "component {name:?}: {} cannot find the image {reference:?} it should have; it \
             said:\n{}",
            engine.name(),
            failed.quoted()
        ),
    };
    if job.verbose {
        eprintln!("{name}: saving {reference} ({image_id})");
    }
    let file_name = match arch {
        Some(arch) => format!("{name}.{arch}.image.tar"),
        None => format!("{name}.image.tar"),
    };
    let archive = staging.join(file_name);
    if let Err(failed) = engine.save(reference, &archive)? {
        let _ = std::fs::remove_file(&archive);
        if failed.disk_full() {
            return Err(disk_full(
                staging,
                &format!(
                    "{} save {reference} said:\n{}",
                    engine.name(),
                    failed.quoted()
                ),
            ));
        }
        check_cancel(&job.cancel)?;
        return Err(save_failed(engine, name, reference, &failed));
    }
    let file = File::open(&archive).with_context(|| format!("opening {}", archive.display()))?;
    let put = chunk(job, store, ArtifactKind::Image, file)
        .with_context(|| format!("component {name:?}: chunking the archive of {reference}"));
    let _ = std::fs::remove_file(&archive);
    let put = put?;
    let archive = ImageArchive {
        index: put.index_digest.as_hex(),
        size: put.index.size,
        image_id,
    };
    Ok((archive, put))
}

fn save_failed(engine: &Engine, name: &str, reference: &str, failed: &Failed) -> anyhow::Error {
    anyhow::anyhow!(
        "component {name:?}: saving the image {reference:?} with {engine} failed ({}); it \
         said:\n{}\nNothing was recorded on the hub.",
        failed.status,
        failed.quoted(),
        engine = engine.name(),
    )
}

/// Chunks `content` into the store, stopping early once cancelled.
fn chunk(
    job: &Job,
    store: &ChunkStore,
    kind: ArtifactKind,
    content: File,
) -> anyhow::Result<PutArtifact> {
    let reader = Cancellable {
        inner: content,
        cancel: &job.cancel,
    };
    Ok(store.put_artifact(kind, reader)?)
}

/// A path named by the manifest, in the exported commit: it must stay in
/// the repository and exist there (as a directory when `dir`).
fn committed_path(
    job: &Job,
    name: &str,
    field: &str,
    path: &str,
    dir: bool,
) -> anyhow::Result<PathBuf> {
    let what = if dir { "directory" } else { "file" };
    let relative = Path::new(path);
    // Resolved by hand from the repository's root, so `..` may reach a
    // sibling of the project's directory but never leave the repository.
    let mut parts: Vec<&std::ffi::OsStr> = job
        .project_dir
        .strip_prefix(&job.export_root)
        .map(|p| p.iter().collect())
        .unwrap_or_default();
    for part in relative.components() {
        let inside = match part {
            PathPart::Normal(p) => {
                parts.push(p);
                true
            }
            PathPart::CurDir => true,
            PathPart::ParentDir => parts.pop().is_some(),
            PathPart::RootDir | PathPart::Prefix(_) => false,
        };
        if !inside {
            bail!(
                "component {name:?}: {field} {path:?} is not a path inside the repository; name \
                 the {what} relative to the project's directory (where {} is)",
                job.manifest_name
            );
        }
    }
    let full = job.project_dir.join(relative);
    let exists = if dir { full.is_dir() } else { full.is_file() };
    if !exists {
        let in_work_tree = job.work_dir.join(relative);
        let uncommitted = if dir {
            in_work_tree.is_dir()
        } else {
            in_work_tree.is_file()
        };
        let advice = if uncommitted {
            format!(
                "it exists in the work tree but is not committed (builds are made from commits): \
                 `git add {path}`, commit, and push again"
            )
        } else {
            format!("add it and commit, or fix {field} in {}", job.manifest_name)
        };
        bail!(
            "component {name:?}: {field} names {path:?}, but commit {} has no such {what} in the \
             project; {advice}. Nothing was recorded on the hub.",
            short(&job.commit),
        );
    }
    // A symlink in the commit could still point outside it.
    let real = full
        .canonicalize()
        .with_context(|| format!("resolving {}", full.display()))?;
    let root = job
        .export_root
        .canonicalize()
        .with_context(|| format!("resolving {}", job.export_root.display()))?;
    if !real.starts_with(&root) {
        bail!(
            "component {name:?}: {field} {path:?} leads outside the repository (through a \
             symlink); name a {what} inside it"
        );
    }
    Ok(real)
}

fn check_cancel(cancel: &AtomicBool) -> anyhow::Result<()> {
    if cancel.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A reader that fails once `cancel` is set, so chunking a large artifact
/// stops at the next read.
struct Cancellable<'a> {
    inner: File,
    cancel: &'a AtomicBool,
}

impl Read for Cancellable<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
        self.inner.read(buf)
    }
}

/// Opens the staging chunk store under `staging`.
pub fn open_store(staging: &Path) -> anyhow::Result<ChunkStore> {
    ChunkStore::open(&staging.join("chunks"), Durability::Cache)
        .map_err(|e| staging_error(e.into(), staging))
}

/// `err`, or when it comes from a full disk, an error that says so and
/// where the staging directory is.
pub fn staging_error(err: anyhow::Error, staging: &Path) -> anyhow::Error {
    let full = err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(trellis_cas::is_disk_full)
    });
    if full {
        disk_full(staging, &causes(&err))
    } else {
        err
    }
}

/// The error's chain joined with `: `, leaving out a cause its outer
/// message already quotes.
fn causes(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

fn disk_full(staging: &Path, cause: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "the disk holding the staging directory {} filled up while Trellis was preparing the \
         build's artifacts there ({cause}). Free space on it, or point TMPDIR at a filesystem \
         with room (e.g. `TMPDIR=/var/tmp trellis push build …`). Nothing was recorded on the hub.",
        staging.display()
    )
}

/// The digests of an artifact's distinct chunks.
pub fn chunk_digests(put: &PutArtifact) -> impl Iterator<Item = Digest> + '_ {
    put.index.distinct_chunks().into_iter().map(|c| c.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_images_are_named_after_project_component_and_commit() {
        assert_eq!(
            built_reference("shop", "web", "0123456789ABCDEF0123456789abcdef01234567"),
            "trellis.local/shop/web:0123456789ab"
        );
    }

    #[test]
    fn a_full_disk_is_reported_with_the_staging_directory_and_tmpdir() {
        let err = trellis_cas::CasError::Io {
            action: "write the temporary chunk file",
            path: "/tmp/x".into(),
            source: io::Error::from_raw_os_error(28),
        };
        let shown = format!(
            "{:#}",
            staging_error(anyhow::Error::from(err), Path::new("/tmp/trellis-push-1"))
        );
        assert!(shown.contains("/tmp/trellis-push-1"), "{shown}");
        assert!(shown.contains("TMPDIR"), "{shown}");
        let other = anyhow::anyhow!("something else");
        let shown = format!("{:#}", staging_error(other, Path::new("/tmp/s")));
        assert_eq!(shown, "something else");
    }
}
