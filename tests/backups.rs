//! Backups of a stage's storage, end to end with the real `trellis`
//! binary: a hub, an agent joined over mutual TLS, a process component
//! with a volume filled with random data.
//!
//! - a backup, 1% of the volume rewritten in scattered places, a second
//!   backup: the second uploads ≤ 3% of the volume (the figure is
//!   printed);
//! - a restore refused while the stage runs; restored once it is
//!   suspended: the volume's checksum is the first backup's again;
//! - a damaged chunk on the hub fails a restore and leaves the volume as
//!   it was;
//! - a backup asked for while the agent is down waits with a message and
//!   completes once it is back;
//! - a restore cut by SIGKILL of the agent in the middle of its swap: the
//!   restarted agent finishes it (never a mix of old and restored);
//! - bad input: an unknown backup, an unknown stage, a non-member;
//! - a container component's volume (Podman and Docker) backed up and
//!   restored under the container's feet while the stage is suspended.
//!
//! The volume is 64 MiB here (CI runs on 2 cores);
//! `TRELLIS_BACKUP_TEST_MIB=1024` runs the same with 1 GiB.

mod common;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::apps::{World, wait_for};
use common::{Cli, bin, describe, git_project};

const MANIFEST: &str = r#"version: v1
components:
  - name: db
    process:
      path: ./db
      command: ["sleep", "3600"]
    storage:
      - name: data
        path: /data
        size: 2Gi
"#;

fn volume_mib() -> u64 {
    std::env::var("TRELLIS_BACKUP_TEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Pseudo-random bytes (xorshift): incompressible, like most data worth
/// backing up.
fn noise(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Every file, directory and link under `dir` with its content digest and
/// mode: equal maps mean equal volumes. `None` if the directory changed
/// under the walk (a swap).
fn try_checksum(dir: &Path) -> Option<BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()? {
            let path = entry.ok()?.path();
            let rel = path.strip_prefix(dir).ok()?.display().to_string();
            let meta = std::fs::symlink_metadata(&path).ok()?;
            let mode = meta.permissions().mode() & 0o7777;
            let what = if meta.is_symlink() {
                format!("link {}", std::fs::read_link(&path).ok()?.display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                format!("dir {mode:o}")
            } else {
                let data = std::fs::read(&path).ok()?;
                format!("file {mode:o} {}", trellis_cas::Digest::of(&data))
            };
            out.insert(rel, what);
        }
    }
    Some(out)
}

fn checksum(dir: &Path) -> BTreeMap<String, String> {
    try_checksum(dir).unwrap_or_else(|| panic!("{} changed while it was read", dir.display()))
}

/// Kills the agent process it holds when dropped.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backup(cli: &Cli, id: u64) -> serde_json::Value {
    cli.json(&["get", "backup", &id.to_string(), "-p", "shop", "-s", "prod"])
}

fn refused(cli: &Cli, args: &[&str], says: &str) -> String {
    let out = cli.run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", describe(&out));
    assert!(err.contains(says), "{args:?}: {err}");
    err
}

/// The hub's chunk files.
fn chunk_files(hub_data: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let root = hub_data.join("artifacts").join("chunks");
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            files.push(f.path());
        }
    }
    files.sort();
    files
}

/// `trellis agent run`, logging into `log`; with a swap held halfway for
/// `swap_delay_ms` when given.
fn agent(data: &Path, log: &Path, swap_delay_ms: Option<u64>) -> Agent {
    let mut command = Command::new(bin());
    command
        .args([
            "agent",
            "run",
            "--no-containers",
            "--health-window",
            "1s",
            "--data",
        ])
        .arg(data)
        .env("TRELLIS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(ms) = swap_delay_ms {
        command.env("TRELLIS_AGENT_RESTORE_SWAP_DELAY_MS", ms.to_string());
    }
    Agent(command.spawn().unwrap())
}

fn logged(log: &Path, line: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains(line))
}

#[test]
fn backups_move_little_restore_whole_and_survive_an_offline_outpost_and_a_crash() {
    let mut w = World::new("shop");
    let app = w.tmp.path().join("app");
    git_project(&app, &[("trellis.yaml", MANIFEST), ("db/README", "db\n")]);
    let out = w.cli.run_in(&app, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    let agent_args = ["--no-containers", "--health-window", "1s"].map(str::to_owned);
    w.stage_on("shop", "prod", "edge", &agent_args);
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "prod"]);
    w.running("shop", "prod", 1, 1);
    let agent_data = w.tmp.path().join("agent-edge");
    let volume = agent_data.join("processes/shop/prod/volumes/db/data");
    assert!(volume.is_dir(), "no volume at {}", volume.display());

    // --- fill the volume: one big file, a directory, a link ---
    let size = volume_mib() << 20;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    {
        let mut f = std::fs::File::create(volume.join("big.bin")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) {
            noise(&mut rng, &mut buf);
            f.write_all(&buf).unwrap();
        }
    }
    std::fs::create_dir_all(volume.join("conf/deep")).unwrap();
    std::fs::write(volume.join("conf/deep/settings.txt"), "answer=42\n").unwrap();
    std::os::unix::fs::symlink("conf/deep/settings.txt", volume.join("settings")).unwrap();
    let original = checksum(&volume);

    // --- first backup ---
    let out = w.cli.ok(&[
        "create",
        "backup",
        "-p",
        "shop",
        "-s",
        "prod",
        "--display-name",
        "first",
        "--wait",
    ]);
    assert!(out.contains("backup 1 completed"), "{out}");
    let first = backup(&w.cli, 1);
    assert_eq!(first["state"], "completed", "{first:#}");
    assert_eq!(first["display_name"], "first");
    assert_eq!(first["volumes"], serde_json::json!(["db/data"]));
    assert!(first["size"].as_u64().unwrap() >= size, "{first:#}");
    let first_uploaded = first["uploaded"].as_u64().unwrap();
    assert!(
        first_uploaded >= size,
        "random data does not compress: {first:#}"
    );

    // --- 1% rewritten in place, scattered: 100 KiB writes ---
    let writes = (size / 100 / (100 << 10)).max(1);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(volume.join("big.bin"))
            .unwrap();
        let mut buf = vec![0u8; 100 << 10];
        for i in 0..writes {
            noise(&mut rng, &mut buf);
            let at = (size / writes) * i + (rng % (size / writes / 2));
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&buf).unwrap();
        }
        f.sync_all().unwrap();
    }
    let changed = checksum(&volume);
    assert_ne!(changed, original);
    let before_second = chunk_files(&w.tmp.path().join("hub"));
    let out = w
        .cli
        .ok(&["create", "backup", "-p", "shop", "-s", "prod", "--wait"]);
    assert!(out.contains("backup 2 completed"), "{out}");
    let second = backup(&w.cli, 2);
    let uploaded = second["uploaded"].as_u64().unwrap();
    let share = uploaded as f64 / size as f64 * 100.0;
    eprintln!(
        "volume {} MiB, {writes} writes of 100 KiB ({:.2}%): second backup uploaded {uploaded} bytes = {share:.2}% of the volume (first: {first_uploaded})",
        size >> 20,
        (writes * (100 << 10)) as f64 / size as f64 * 100.0
    );
    assert!(
        share <= 3.0,
        "the second backup moved {share:.2}% of the volume"
    );

    // --- restore refused while the stage runs ---
    let err = refused(
        &w.cli,
        &["restore", "backup", "1", "-p", "shop", "-s", "prod"],
        "must be suspended first",
    );
    assert!(err.contains("trellis suspend stage prod -p shop"), "{err}");

    // --- restore of the first backup, stage suspended ---
    w.cli.ok(&["suspend", "stage", "prod", "-p", "shop"]);
    let out = w
        .cli
        .ok(&["restore", "backup", "1", "-p", "shop", "-s", "prod"]);
    assert!(out.contains("restored backup 1"), "{out}");
    assert_eq!(
        checksum(&volume),
        original,
        "the restore brought other bytes back"
    );
    assert_eq!(backup(&w.cli, 1)["restore"]["state"], "completed");

    // --- a damaged chunk on the hub: the restore fails, nothing changes ---
    let new_chunks: Vec<PathBuf> = chunk_files(&w.tmp.path().join("hub"))
        .into_iter()
        .filter(|f| !before_second.contains(f))
        .filter(|f| {
            // Not the manifest (JSON): a data chunk.
            let data = zstd::decode_all(&std::fs::read(f).unwrap()[..]).unwrap();
            !data.starts_with(b"{")
        })
        .collect();
    assert!(!new_chunks.is_empty());
    let victim = &new_chunks[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(victim, &bytes).unwrap();
    let out = w
        .cli
        .run(&["restore", "backup", "2", "-p", "shop", "-s", "prod"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        err.contains("backup 2") && err.contains("damaged") && err.contains("nothing was replaced"),
        "{err}"
    );
    assert_eq!(
        checksum(&volume),
        original,
        "a failed restore changed the volume"
    );
    let listed = std::fs::read_dir(volume.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(listed, ["data"], "a failed restore left staging behind");

    // --- a backup asked for while the agent is down ---
    w.agents.pop().unwrap().kill9();
    wait_for(Duration::from_secs(30), || {
        w.status("shop", "prod")["link"]["state"] != "online"
    });
    let out = w.cli.ok(&["create", "backup", "-p", "shop", "-s", "prod"]);
    assert!(out.contains("backup 3"), "{out}");
    let third = backup(&w.cli, 3);
    assert_eq!(third["state"], "pending", "{third:#}");
    assert!(
        third["message"]
            .as_str()
            .unwrap()
            .contains("waits for outpost \"edge\""),
        "{third:#}"
    );
    // Back with the swap slowed down, for the crash below.
    let log = w.tmp.path().join("agent.log");
    let mut slow = agent(&agent_data, &log, Some(4000));
    let done = wait_for(Duration::from_secs(120), || {
        backup(&w.cli, 3)["state"] == "completed"
    });
    assert!(
        done,
        "the waiting backup never completed: {:#}",
        backup(&w.cli, 3)
    );

    // --- a restore cut by SIGKILL in the middle of its swap ---
    std::fs::write(volume.join("conf/deep/settings.txt"), "answer=43\n").unwrap();
    let before_restore = checksum(&volume);
    w.cli.ok(&[
        "restore",
        "backup",
        "1",
        "-p",
        "shop",
        "-s",
        "prod",
        "--no-wait",
    ]);
    let swapping = wait_for(Duration::from_secs(120), || {
        logged(&log, "swapping the volumes in")
    });
    assert!(swapping, "the agent never began the swap");
    // Inside the hold: the live volume is set aside, the restored one not
    // yet in its place.
    std::thread::sleep(Duration::from_millis(1500));
    slow.0.kill().unwrap();
    slow.0.wait().unwrap();
    assert!(!volume.exists(), "the kill was meant to land mid-swap");
    let log2 = w.tmp.path().join("agent2.log");
    let _back = agent(&agent_data, &log2, None);
    let recovered = wait_for(Duration::from_secs(60), || {
        logged(&log2, "finished the swap of a restore")
    });
    assert!(recovered, "the restarted agent did not finish the swap");
    // The hub sends the open restore again, which runs whole once more:
    // whenever the volume can be read it is the old or the restored one.
    let restored = wait_for(Duration::from_secs(120), || {
        if let Some(now) = try_checksum(&volume) {
            assert!(
                now == original || now == before_restore,
                "the volume is a mix of old and restored content"
            );
        }
        backup(&w.cli, 1)["restore"]["state"] == "completed"
    });
    assert!(restored, "{:#}", backup(&w.cli, 1));
    assert_eq!(
        checksum(&volume),
        original,
        "the restore was rolled back, not finished"
    );

    // --- bad input ---
    refused(
        &w.cli,
        &["get", "backup", "999", "-p", "shop", "-s", "prod"],
        "does not exist",
    );
    refused(
        &w.cli,
        &["create", "backup", "-p", "shop", "-s", "nope"],
        "does not exist",
    );
    refused(
        &w.cli,
        &["restore", "backup", "999", "-p", "shop", "-s", "prod"],
        "does not exist",
    );
    let created = w.cli.ok(&["create", "user", "bob"]);
    let bob_key = created.lines().last().unwrap().trim().to_owned();
    let bob = Cli::for_hub(&w.hub, &bob_key, &w.tmp.path().join("bob"));
    refused(
        &bob,
        &["list", "backup", "-p", "shop", "-s", "prod"],
        "does not exist",
    );
    refused(
        &bob,
        &["create", "backup", "-p", "shop", "-s", "prod"],
        "does not exist",
    );
    refused(
        &bob,
        &["restore", "backup", "1", "-p", "shop", "-s", "prod"],
        "does not exist",
    );

    // --- audit entries, and deletion ---
    let audit = w.cli.json(&["list", "audit", "-p", "shop"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"backup") && actions.contains(&"restore"),
        "{actions:?}"
    );
    w.cli
        .ok(&["delete", "backup", "2", "-p", "shop", "-s", "prod"]);
    refused(
        &w.cli,
        &["get", "backup", "2", "-p", "shop", "-s", "prod"],
        "does not exist",
    );
    let audit = w.cli.json(&["list", "audit", "-p", "shop"]);
    assert_eq!(audit[0]["action"], "backup-delete", "{audit:#}");
}

// === container volumes (Podman and Docker through the test kit) ===

fn container_manifest(image: &str) -> String {
    format!(
        r#"version: v1
components:
  - name: app
    docker:
      image: {image}
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
    storage:
      - name: data
        path: /data
        size: 1Gi
"#
    )
}

fn in_app(cli: &Cli, script: &str) -> String {
    cli.ok(&[
        "exec", "app", "-p", "box", "-s", "c", "--", "sh", "-c", script,
    ])
}

fn a_container_volume_is_backed_up_and_restored(kind: trellis_testkit::engines::EngineKind) {
    let Some(mut on) = common::apps::OnEngine::new(kind) else {
        return;
    };
    let image = on.engine.busybox_image().to_owned();
    let outpost = on.outpost("backup-edge");
    let mut w = World::new("box");
    let app = w.tmp.path().join("app");
    git_project(
        &app,
        &[("trellis.yaml", container_manifest(&image).as_str())],
    );
    let out = on.push_build(&w.cli, &app, "box");
    assert!(out.status.success(), "{}", describe(&out));
    let args = [
        "--docker-host",
        &on.engine.docker_host(),
        "--health-window",
        "2s",
    ]
    .map(str::to_owned);
    w.stage_on("box", "c", &outpost, &args);
    w.cli.ok(&["push", "release", "-p", "box", "-s", "c"]);
    w.running("box", "c", 1, 1);

    in_app(
        &w.cli,
        "mkdir -p /data/d && echo one > /data/v.txt && head -c 3000000 /dev/urandom > /data/d/blob && chmod 600 /data/v.txt",
    );
    let sums = "md5sum /data/v.txt /data/d/blob; stat -c %a /data/v.txt";
    let before = in_app(&w.cli, sums);
    let out = w
        .cli
        .ok(&["create", "backup", "-p", "box", "-s", "c", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    let b = w.cli.json(&["get", "backup", "1", "-p", "box", "-s", "c"]);
    assert_eq!(b["volumes"], serde_json::json!(["app/data"]), "{b:#}");
    assert!(b["size"].as_u64().unwrap() >= 3_000_000, "{b:#}");

    in_app(&w.cli, "echo two > /data/v.txt && rm -r /data/d");
    assert_eq!(in_app(&w.cli, "cat /data/v.txt; ls /data"), "two\nv.txt\n");
    w.cli.ok(&["suspend", "stage", "c", "-p", "box"]);
    let out = w
        .cli
        .ok(&["restore", "backup", "1", "-p", "box", "-s", "c"]);
    assert!(out.contains("restored backup 1"), "{out}");
    w.cli.ok(&["resume", "stage", "c", "-p", "box"]);
    let back = wait_for(Duration::from_secs(120), || {
        let out = w.cli.run(&[
            "exec", "app", "-p", "box", "-s", "c", "--", "sh", "-c", sums,
        ]);
        out.status.success() && String::from_utf8_lossy(&out.stdout) == before
    });
    assert!(
        back,
        "the container does not see the restored volume: {}",
        in_app(&w.cli, sums)
    );
}

#[test]
fn a_podman_container_volume_is_backed_up_and_restored() {
    a_container_volume_is_backed_up_and_restored(trellis_testkit::engines::EngineKind::Podman);
}

#[test]
fn a_docker_container_volume_is_backed_up_and_restored() {
    a_container_volume_is_backed_up_and_restored(trellis_testkit::engines::EngineKind::Docker);
}

/// A schedule on a stage of the hub's local outpost (whose agent is part of
/// the hub): backups are made at its times and only the newest `keep`
/// scheduled ones are kept; one made by hand stays.
#[test]
fn scheduled_backups_are_made_and_only_the_newest_are_kept() {
    let w = World::new("shop");
    let app = w.tmp.path().join("app");
    git_project(&app, &[("trellis.yaml", MANIFEST), ("db/README", "db\n")]);
    let out = w.cli.run_in(&app, &["push", "build", "-p", "shop"]);
    assert!(out.status.success(), "{}", describe(&out));
    w.cli.ok(&["create", "stage", "dev", "-p", "shop"]);
    w.cli.ok(&["push", "release", "-p", "shop", "-s", "dev"]);
    w.running("shop", "dev", 1, 1);
    let volume = w
        .tmp
        .path()
        .join("hub/local-outpost/processes/shop/dev/volumes/db/data");
    assert!(volume.is_dir(), "no volume at {}", volume.display());
    std::fs::write(volume.join("notes.txt"), "kept\n").unwrap();
    let by_hand = w
        .cli
        .ok(&["create", "backup", "-p", "shop", "-s", "dev", "--wait"]);
    assert!(by_hand.contains("backup 1 completed"), "{by_hand}");

    let err = refused(
        &w.cli,
        &[
            "update",
            "stage",
            "dev",
            "-p",
            "shop",
            "--backup-schedule",
            "nightly",
            "--backup-keep",
            "2",
        ],
        "is not a cron schedule",
    );
    assert!(err.contains("0 3 * * *"), "{err}");
    let out = w.cli.ok(&[
        "update",
        "stage",
        "dev",
        "-p",
        "shop",
        "--backup-schedule",
        "*/2 * * * * *",
        "--backup-keep",
        "2",
    ]);
    assert!(out.contains("keeping the newest 2"), "{out}");
    let list = || w.cli.json(&["list", "backup", "-p", "shop", "-s", "dev"]);
    let mut last = serde_json::Value::Null;
    let enough = wait_for(Duration::from_secs(90), || {
        last = list();
        let all = last.as_array().unwrap();
        let newest = all.iter().map(|b| b["id"].as_u64().unwrap()).max().unwrap();
        newest >= 5
    });
    assert!(enough, "the schedule made too few backups: {last:#}");
    w.cli.ok(&[
        "update",
        "stage",
        "dev",
        "-p",
        "shop",
        "--no-backup-schedule",
    ]);
    // The last one asked for may still be running; let it end.
    let settled = wait_for(Duration::from_secs(60), || {
        last = list();
        last.as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "completed")
    });
    assert!(settled, "{last:#}");
    let all = last.as_array().unwrap();
    let scheduled: Vec<_> = all
        .iter()
        .filter(|b| b["created_by"] == "schedule")
        .collect();
    assert_eq!(
        scheduled.len(),
        2,
        "only the newest two scheduled backups are kept: {last:#}"
    );
    assert!(
        all.iter().any(|b| b["id"] == 1),
        "the backup made by hand was deleted: {last:#}"
    );
    assert!(
        scheduled
            .iter()
            .all(|b| b["volumes"] == serde_json::json!(["db/data"]))
    );
    refused(
        &w.cli,
        &[
            "update",
            "stage",
            "dev",
            "-p",
            "shop",
            "--no-backup-schedule",
        ],
        "has no backup schedule",
    );
}
