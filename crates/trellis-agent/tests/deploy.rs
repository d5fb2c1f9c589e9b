//! The deployer over the real process runtime: what a user sees when a
//! release does not come up, when a component starts failing later, when
//! the outpost cannot run a component at all, and when its disk is full.
//! Packages come from a chunk store in a temporary directory, standing in
//! for the hub.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use trellis_agent::deploy::{DeployOptions, Deployer};
use trellis_agent::runtime::Runtime;
use trellis_agent::runtime::artifacts::{ArtifactSource, LocalArtifacts};
use trellis_agent::runtime::process::{ProcessOptions, ProcessRuntime};
use trellis_agent::{StageKey, StageRunner};
use trellis_cas::{ArtifactKind, ChunkStore, Durability};

struct World {
    dir: tempfile::TempDir,
    blobs: ChunkStore,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let blobs = ChunkStore::open(&dir.path().join("hub-blobs"), Durability::Synced).unwrap();
        World { dir, blobs }
    }

    fn packages(&self) -> Arc<dyn ArtifactSource> {
        Arc::new(LocalArtifacts::new(self.blobs.clone()))
    }

    /// A deployer with a quick health check over a process runtime whose
    /// directory is `root`.
    fn deployer(&self, root: &Path) -> Deployer {
        let runtime = ProcessRuntime::with_options(
            root.join("processes"),
            self.packages(),
            ProcessOptions {
                stop_grace: Duration::from_secs(2),
                restart_initial: Duration::from_millis(100),
                restart_max: Duration::from_millis(500),
                tick: Duration::from_millis(50),
                ..ProcessOptions::default()
            },
        );
        Deployer::new(
            root,
            vec![Arc::new(runtime) as Arc<dyn Runtime>],
            DeployOptions {
                health_window: Duration::from_secs(10),
                settle: Duration::from_secs(1),
                probe_interval: Duration::from_millis(100),
                ..DeployOptions::default()
            },
        )
    }

    /// Packs `files` (path, content) into a package in the blob store.
    fn package(&self, files: &[(&str, &[u8])]) -> (String, u64) {
        let src = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let p = src.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut tar = Vec::new();
        trellis_cas::pack_dir(src.path(), &mut tar).unwrap();
        let put = self
            .blobs
            .put_artifact(ArtifactKind::Package, &tar[..])
            .unwrap();
        (put.index_digest.to_string(), put.index.size)
    }
}

/// The desired state the hub would send: release `release` of a build
/// whose one process component `app` runs `script` from its package.
fn desired(release: u64, package: &(String, u64), manifest_extra: &str) -> serde_json::Value {
    let manifest = format!(
        "version: v1\ncomponents:\n  - name: app\n    process:\n      path: ./app\n      command: [\"sh\", \"./run.sh\"]\n{manifest_extra}"
    );
    json!({
        "revision": release,
        "suspended": false,
        "release": {
            "project": "p", "stage": "s", "number": release, "build": format!("main_b{release}"),
            "config": null, "revision": release, "state": "pending",
            "created_at": "2026-01-01T00:00:00Z", "created_by": "admin"
        },
        "build": {
            "project": "p", "name": format!("main_b{release}"), "number": release,
            "branch": "main", "commit": "abc", "manifest_file": "trellis.yaml",
            "manifest": manifest,
            "components": [
                {"name": "app", "artifact": {"kind": "package", "digest": package.0, "size": package.1}}
            ],
            "created_at": "2026-01-01T00:00:00Z", "created_by": "admin"
        }
    })
}

fn stage(name: &str) -> StageKey {
    StageKey::new("plant", name)
}

#[tokio::test]
async fn a_first_release_that_does_not_come_up_leaves_the_stage_empty_and_says_so() {
    let w = World::new();
    let d = w.deployer(w.dir.path());
    let pkg = w.package(&[(
        "run.sh",
        b"#!/bin/sh\necho 'no config, giving up' >&2\nexit 4\n",
    )]);
    let s = stage("first");
    let outcome = d.apply(&s, 1, &desired(1, &pkg, "")).await;
    assert!(!outcome.ok);
    assert_eq!(outcome.state, "failed");
    assert_eq!(outcome.rolled_back_to, Some(0));
    let message = outcome.message.unwrap();
    assert!(message.contains("release 1"), "{message}");
    assert!(message.contains("exited with code 4"), "{message}");
    assert!(message.contains("runs nothing"), "{message}");
    let app = outcome.components.iter().find(|c| c.name == "app").unwrap();
    assert_eq!(app.exit_code, Some(4), "{app:?}");
    // Nothing of it runs any more.
    let now = d.observe(&s, 1).await.unwrap();
    assert!(
        now.components.iter().all(|c| c.running == 0),
        "{:?}",
        now.components
    );
    d.remove(&s).await.unwrap();
}

#[tokio::test]
async fn a_component_that_starts_failing_later_is_reported_with_restarts_and_exit_code() {
    let w = World::new();
    let d = w.deployer(w.dir.path());
    // Up long enough to pass the health check, then dies, again and again.
    let pkg = w.package(&[("run.sh", b"#!/bin/sh\nsleep 2\nexit 7\n")]);
    let s = stage("later");
    let outcome = d.apply(&s, 1, &desired(1, &pkg, "")).await;
    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(outcome.state, "running");
    let end = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while Instant::now() < end {
        let now = d.observe(&s, 1).await.unwrap();
        let looping = now
            .components
            .iter()
            .any(|a| a.name == "app" && a.restarts >= 2 && a.exit_code == Some(7));
        last = Some(now);
        if looping {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = last.unwrap();
    let app = now.components.iter().find(|c| c.name == "app").unwrap();
    assert!(app.restarts >= 2, "{app:?}");
    assert_eq!(app.exit_code, Some(7));
    // The stage says which component is in trouble (when the observation
    // caught it between runs) — never a silent green with a hidden loop.
    if now.state == "degraded" {
        let message = now.message.clone().unwrap();
        assert!(message.contains("component app"), "{message}");
    }
    d.remove(&s).await.unwrap();
}

#[tokio::test]
async fn a_container_component_on_an_outpost_without_an_engine_is_refused_clearly() {
    let w = World::new();
    let d = w.deployer(w.dir.path());
    let mut desired = desired(1, &("0".repeat(64), 1), "");
    desired["build"]["manifest"] =
        json!("version: v1\ncomponents:\n  - name: db\n    docker: {image: \"localhost/db:1\"}\n");
    desired["build"]["components"] =
        json!([{"name": "db", "artifact": {"kind": "image", "reference": "localhost/db:1"}}]);
    let outcome = d.apply(&stage("engine"), 1, &desired).await;
    assert!(!outcome.ok);
    let message = outcome.message.unwrap();
    assert!(message.contains("no container engine"), "{message}");
    assert!(message.contains("component db"), "{message}");
}

#[tokio::test]
async fn garbage_desired_state_fails_the_revision_without_touching_what_runs() {
    let w = World::new();
    let d = w.deployer(w.dir.path());
    let pkg = w.package(&[("run.sh", b"#!/bin/sh\nexec sleep 60\n")]);
    let s = stage("garbage");
    assert!(d.apply(&s, 1, &desired(1, &pkg, "")).await.ok);
    let before = d.observe(&s, 1).await.unwrap().components[0].ids.clone();
    for bad in [
        json!({"release": 7}),
        json!({"revision": 2, "release": {"number": 2}, "build": {"manifest": "::"}}),
    ] {
        let outcome = d.apply(&s, 2, &bad).await;
        assert!(!outcome.ok);
        assert!(outcome.message.unwrap().contains("revision 2"));
        assert_eq!(outcome.rolled_back_to, Some(1));
    }
    let after = d.observe(&s, 1).await.unwrap().components[0].ids.clone();
    assert_eq!(before, after, "what ran was touched");
    d.remove(&s).await.unwrap();
}

/// A full disk fails the one release that needs the space, with a message
/// that says so; another stage on the same outpost keeps running.
#[tokio::test]
async fn a_full_disk_fails_one_stage_and_not_the_other() {
    let w = World::new();
    let root = w.dir.path().join("small-disk");
    std::fs::create_dir_all(&root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&root)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        if std::env::var_os("CI").is_some() {
            panic!("cannot mount a small tmpfs (CI runs as root, so this should work)");
        }
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(root.clone());

    let d = w.deployer(&root);
    let small = w.package(&[("run.sh", b"#!/bin/sh\nexec sleep 60\n")]);
    let running = stage("fits");
    assert!(d.apply(&running, 1, &desired(1, &small, "")).await.ok);

    // 6 MiB that does not compress: the package alone overflows the disk.
    let mut noise = vec![0u8; 6 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let big = w.package(&[
        ("run.sh", b"#!/bin/sh\nexec sleep 60\n"),
        ("blob.bin", &noise),
    ]);
    let full = stage("too-big");
    let outcome = d.apply(&full, 1, &desired(1, &big, "")).await;
    assert!(!outcome.ok, "{outcome:?}");
    let message = outcome.message.unwrap().to_lowercase();
    assert!(
        message.contains("disk is full") || message.contains("no space"),
        "{message}"
    );

    // The other stage was not disturbed.
    let now = d.observe(&running, 1).await.unwrap();
    assert_eq!(now.state, "running", "{now:?}");
    assert_eq!(now.components[0].running, 1, "{now:?}");
    d.remove(&running).await.unwrap();
    d.remove(&full).await.unwrap();
}

/// An agent's artifact cache fed from the "hub" store of the world: copies
/// the chunks it lacks, and holds each delivery at `gate` once it is half
/// done, so a test can look at the cache while a delivery is in flight.
struct CacheFromHub {
    hub: ChunkStore,
    cache: ChunkStore,
    gate: tokio::sync::Semaphore,
    held: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl ArtifactSource for CacheFromHub {
    async fn fetch(
        &self,
        index: &str,
        progress: trellis_agent::runtime::artifacts::Progress<'_>,
    ) -> Result<trellis_cas::ArtifactIndex, trellis_agent::runtime::RuntimeError> {
        let digest: trellis_cas::Digest = index.parse().unwrap();
        let artifact = self.hub.artifact(&digest).unwrap();
        let copy = |d: &trellis_cas::Digest| {
            if !self.cache.contains(d) {
                let stored = std::fs::read(self.hub.path(d)).unwrap();
                self.cache.insert_stored(d, &stored).unwrap();
            }
        };
        copy(&digest);
        let missing = self.cache.missing(&artifact);
        for (i, chunk) in missing.iter().enumerate() {
            if i == missing.len() / 2 {
                if self.gate.available_permits() == 0 {
                    self.held.notify_one();
                }
                let _permit = self.gate.acquire().await.unwrap();
            }
            copy(&chunk.digest);
        }
        progress(artifact.size);
        Ok(artifact)
    }

    fn store(&self) -> &ChunkStore {
        &self.cache
    }

    fn is_cache(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn the_cache_keeps_current_and_previous_releases_and_what_is_in_flight() {
    let w = World::new();
    let source = Arc::new(CacheFromHub {
        hub: w.blobs.clone(),
        cache: ChunkStore::open(&w.dir.path().join("cache"), Durability::Cache).unwrap(),
        gate: tokio::sync::Semaphore::new(100),
        held: tokio::sync::Notify::new(),
    });
    let root = w.dir.path().join("agent");
    let runtime = ProcessRuntime::with_options(
        root.join("processes"),
        source.clone(),
        ProcessOptions {
            tick: Duration::from_millis(50),
            ..ProcessOptions::default()
        },
    );
    let d = Arc::new(
        Deployer::new(
            &root,
            vec![Arc::new(runtime) as Arc<dyn Runtime>],
            DeployOptions {
                health_window: Duration::from_secs(10),
                settle: Duration::from_millis(300),
                probe_interval: Duration::from_millis(50),
                ..DeployOptions::default()
            },
        )
        .with_artifacts(source.clone()),
    );
    // Four releases, each with its own large file (several chunks).
    let packages: Vec<(String, u64)> = (1..=4u8)
        .map(|n| {
            let mut data = vec![0u8; 1 << 20];
            blake3::Hasher::new()
                .update(&[n])
                .finalize_xof()
                .fill(&mut data);
            w.package(&[
                ("run.sh", b"#!/bin/sh\nexec sleep 1000\n"),
                ("data.bin", &data),
            ])
        })
        .collect();
    let chunks_of = |p: &(String, u64)| {
        let artifact = w.blobs.artifact(&p.0.parse().unwrap()).unwrap();
        let mut all: Vec<trellis_cas::Digest> = artifact
            .distinct_chunks()
            .iter()
            .map(|c| c.digest)
            .collect();
        all.push(p.0.parse().unwrap());
        all
    };
    let cached = |p: &(String, u64)| {
        let chunks = chunks_of(p);
        chunks.iter().filter(|c| source.cache.contains(c)).count() as f64 / chunks.len() as f64
    };
    let s = stage("gc");
    for n in 1..=3u64 {
        let outcome = d
            .apply(&s, n, &desired(n, &packages[n as usize - 1], ""))
            .await;
        assert!(outcome.ok, "{outcome:?}");
    }
    // Release 3 runs, 2 is the one before it; 1 is freed.
    assert_eq!(cached(&packages[2]), 1.0);
    assert_eq!(cached(&packages[1]), 1.0);
    assert!(cached(&packages[0]) < 0.5, "release 1 is still cached");

    // Release 4's delivery is held halfway; a collection asked for now
    // waits for it and frees none of what it fetched.
    let permits = source.gate.available_permits();
    let _all = source.gate.acquire_many(permits as u32).await.unwrap();
    let apply = {
        let d = d.clone();
        let s = s.clone();
        let desired = desired(4, &packages[3], "");
        tokio::spawn(async move { d.apply(&s, 4, &desired).await })
    };
    source.held.notified().await;
    let partly = cached(&packages[3]);
    assert!(partly > 0.0 && partly < 1.0, "{partly}");
    let collect = {
        let d = d.clone();
        tokio::spawn(async move { d.collect_garbage().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !collect.is_finished(),
        "the collection ran during a delivery"
    );
    assert!(cached(&packages[3]) >= partly);
    drop(_all);
    let outcome = apply.await.unwrap();
    assert!(outcome.ok, "{outcome:?}");
    collect.await.unwrap().unwrap();
    assert_eq!(cached(&packages[3]), 1.0);
    assert_eq!(cached(&packages[2]), 1.0, "the previous release is kept");
    assert!(cached(&packages[1]) < 0.5, "release 2 is still cached");
    d.remove(&s).await.unwrap();
}

/// The desired state of [`desired`] with the stage's components stopped on
/// request (as `trellis stop component app` sends it).
fn stopped(mut desired: serde_json::Value) -> serde_json::Value {
    desired["controls"] = json!({"app": {"stopped": true}});
    desired
}

#[tokio::test]
async fn an_exclusive_device_is_held_by_one_replica_of_one_component_on_the_outpost() {
    let w = World::new();
    let node = w.dir.path().join("cam");
    let made = std::process::Command::new("mknod")
        .arg(&node)
        .args(["c", "1", "5"])
        .status()
        .unwrap();
    if !made.success() {
        assert!(std::env::var_os("CI").is_none(), "mknod needs root");
        eprintln!("skipped: mknod needs root");
        return;
    }
    let offers = trellis_agent::devices::DeviceOffers::new(
        &[format!("cam={}", node.display()).parse().unwrap()],
        None,
        &["cam".into()],
        &[],
    )
    .unwrap()
    .for_outpost("plant-7");
    let d = w.deployer(w.dir.path()).with_devices(offers);
    let pkg = w.package(&[("run.sh", b"#!/bin/sh\nexec sleep 1000\n")]);
    let asks = "    devices: [{name: cam}]\n";

    // Two replicas of one component: refused before anything runs.
    let two = format!("{asks}    scaling: {{min: 2, max: 2}}\n");
    let outcome = d.apply(&stage("one"), 1, &desired(1, &pkg, &two)).await;
    assert!(!outcome.ok);
    let message = outcome.message.unwrap();
    assert!(
        message.contains("device \"cam\" of outpost plant-7 is exclusive")
            && message.contains("with 2 replicas"),
        "{message}"
    );
    assert!(outcome.components.is_empty(), "nothing was started");

    // One replica holds it; another stage is refused it, naming the holder.
    let outcome = d.apply(&stage("one"), 2, &desired(2, &pkg, asks)).await;
    assert!(outcome.ok, "{:?}", outcome.message);
    assert_eq!(outcome.components[0].devices, ["cam"]);
    let outcome = d.apply(&stage("two"), 1, &desired(1, &pkg, asks)).await;
    assert!(!outcome.ok);
    let message = outcome.message.unwrap();
    assert!(
        message.contains("held by stage plant/one (component \"app\")"),
        "{message}"
    );

    // Stopped, the holder lets go of it; the other stage may have it.
    let outcome = d
        .apply(&stage("one"), 3, &stopped(desired(2, &pkg, asks)))
        .await;
    assert!(outcome.ok, "{:?}", outcome.message);
    assert!(
        outcome.components[0].devices.is_empty(),
        "a stopped component holds nothing"
    );
    let outcome = d.apply(&stage("two"), 2, &desired(2, &pkg, asks)).await;
    assert!(outcome.ok, "{:?}", outcome.message);

    // Unplugged while it runs: the observation says so.
    std::fs::remove_file(&node).unwrap();
    let observed = d.observe(&stage("two"), 2).await.unwrap();
    assert_eq!(observed.state, "degraded");
    let notice = &observed.notices[0];
    assert_eq!(notice.code, "device-missing");
    assert!(
        notice.message.contains("device \"cam\"") && notice.message.contains("is gone"),
        "{}",
        notice.message
    );
    for s in ["one", "two"] {
        d.remove(&stage(s)).await.unwrap();
    }
}
