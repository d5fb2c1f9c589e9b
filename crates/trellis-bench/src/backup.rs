//! `backup`: what a second backup of a volume that changed little moves,
//! and how long backups and a restore take. The real agent (production
//! runtimes, mutual TLS to an in-process hub on loopback) backs up a
//! process component's volume filled with random data; then 1% of it is
//! rewritten in scattered 100 KiB writes and it is backed up again; then
//! the stage is suspended and the first backup restored, and the volume
//! is checked against the original.
//!
//! "Uploaded" is the backup record's own figure: the stored (compressed)
//! bytes of the chunks the agent sent because the hub lacked them.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::report::Report;
use crate::setup::BenchHub;

pub struct Settings {
    pub size: u64,
    pub work_dir: Option<PathBuf>,
    pub json: Option<PathBuf>,
}

const BACKUPS: &str = "/projects/bench/stages/line/backups";

pub async fn run(s: Settings) -> anyhow::Result<()> {
    let work = match &s.work_dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let hub = BenchHub::start(&work.path().join("hub")).await?;
    let dir = work.path().join("agent");
    drop(hub.joined_agent("edge", &dir).await?);
    hub.stage_on_outpost("edge").await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = {
        let dir = dir.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let options = trellis_agent::AgentOptions {
                runtime_settings: trellis_agent::RuntimeSettings {
                    containers: false,
                    ..Default::default()
                },
                ..Default::default()
            };
            trellis_agent::run(&dir, options, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        })
    };

    // The volume of component `db`'s storage `data`, as the process
    // runtime lays it out.
    let volume = dir.join("processes/bench/line/volumes/db/data");
    std::fs::create_dir_all(&volume)?;
    let file = volume.join("big.bin");
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    fill(&file, s.size, &mut rng)?;
    let original = digest_of(&file)?;

    let started = Instant::now();
    let first = backup(&hub).await?;
    let first_secs = started.elapsed().as_secs_f64();

    let writes = (s.size / 100 / (100 << 10)).max(1);
    rewrite(&file, s.size, writes, &mut rng)?;
    let started = Instant::now();
    let second = backup(&hub).await?;
    let second_secs = started.elapsed().as_secs_f64();

    hub.api(
        reqwest::Method::POST,
        "/projects/bench/stages/line/suspend",
        None,
    )
    .await?;
    let id = first["id"].as_u64().context("a backup has an id")?;
    let started = Instant::now();
    hub.api(
        reqwest::Method::POST,
        &format!("{BACKUPS}/{id}/restore"),
        None,
    )
    .await?;
    wait(&hub, id, |b| {
        let state = &b["restore"]["state"];
        if state == "failed" {
            bail!("the restore failed: {}", b["restore"]["message"]);
        }
        Ok(state == "completed")
    })
    .await?;
    let restore_secs = started.elapsed().as_secs_f64();
    if digest_of(&file)? != original {
        bail!("the restored volume differs from the original");
    }
    let _ = stop.send(true);
    agent.await??;

    let mib = s.size as f64 / f64::from(1 << 20);
    let uploaded = |b: &Value| b["uploaded"].as_u64().unwrap_or(0) as f64;
    let share = uploaded(&second) / s.size as f64 * 100.0;
    let mut report = Report::new(
        "backup",
        json!({"size_mib": s.size >> 20, "writes": writes, "write_kib": 100}),
    );
    report.add("volume", mib, "MiB");
    report.add(
        "rewritten",
        (writes * (100 << 10)) as f64 / s.size as f64 * 100.0,
        "%",
    );
    report.add(
        "first backup: uploaded",
        uploaded(&first) / f64::from(1 << 20),
        "MiB",
    );
    report.add("first backup: time", first_secs, "s");
    report.add(
        "second backup: uploaded",
        uploaded(&second) / f64::from(1 << 20),
        "MiB",
    );
    report.at_most(
        "second backup: uploaded share of the volume",
        share,
        "%",
        3.0,
    );
    report.add("second backup: time", second_secs, "s");
    report.add("restore of the first: time", restore_secs, "s");
    report.note(
        "times include the hub noticing the request and the agent being told over its link; \
         the hub stores every chunk synced to disk",
    );
    report.finish(s.json.as_deref())?;
    Ok(())
}

/// Asks for a backup and waits until it completed; returns its record.
async fn backup(hub: &BenchHub) -> anyhow::Result<Value> {
    let created = hub
        .api(reqwest::Method::POST, BACKUPS, Some(json!({})))
        .await?;
    let id = created["id"].as_u64().context("a backup has an id")?;
    wait(hub, id, |b| {
        if b["state"] == "failed" {
            bail!("backup {id} failed: {}", b["message"]);
        }
        Ok(b["state"] == "completed")
    })
    .await
}

async fn wait(
    hub: &BenchHub,
    id: u64,
    done: impl Fn(&Value) -> anyhow::Result<bool>,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let b = hub
            .api(reqwest::Method::GET, &format!("{BACKUPS}/{id}"), None)
            .await?;
        if done(&b)? {
            return Ok(b);
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("backup {id} did not get there within 30 minutes: {b}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn noise(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn fill(path: &Path, size: u64, rng: &mut u64) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        noise(rng, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// `writes` writes of 100 KiB, one in each of `writes` equal stretches.
fn rewrite(path: &Path, size: u64, writes: u64, rng: &mut u64) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut buf = vec![0u8; 100 << 10];
    let stretch = size / writes;
    for i in 0..writes {
        noise(rng, &mut buf);
        let at = stretch * i + (*rng % (stretch.saturating_sub(buf.len() as u64).max(1)));
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The digests of the file's MiB, in order (without holding all of it).
fn digest_of(path: &Path) -> anyhow::Result<Vec<trellis_cas::Digest>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            let got = f.read(&mut buf[n..])?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            return Ok(out);
        }
        out.push(trellis_cas::Digest::of(&buf[..n]));
    }
}
