//! `trellis-bench artifacts`: what a small change to a large image costs.
//!
//! 1. A project whose one component is built from a Dockerfile `FROM
//!    scratch` with two layers: incompressible bytes (3/4 of the size) and
//!    text (1/4). `trellis push build` builds it with the local engine and
//!    uploads it; the push goes through a counting TCP proxy, so the bytes
//!    reported are what crossed the link, TLS and HTTP included.
//! 2. The full first delivery to an outpost (the agent's own fetcher into
//!    an empty cache) is timed against a plain HTTPS download of the same
//!    artifact from the same hub (`/api/v1/agent/artifacts/{index}/content`),
//!    alternating which goes first; medians of `runs` each.
//! 3. 1% of the image's size is rewritten in the middle of the big layer's
//!    file, committed and pushed again; then delivered to the outpost that
//!    holds the first image. Both transfers are counted through the proxy.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};
use trellis_agent::runtime::artifacts::{ArtifactSource, HubArtifacts};
use trellis_cas::{ChunkStore, Durability};
use trellis_faultproxy::FaultProxy;

use crate::setup::{self, BenchHub, median, mib};

pub struct Settings {
    pub size: u64,
    pub runs: usize,
    pub trellis: PathBuf,
    pub work_dir: Option<PathBuf>,
}

const MANIFEST: &str = "version: v1
components:
  - name: app
    docker:
      file: Dockerfile
";

const DOCKERFILE: &str = "FROM scratch
COPY big.bin /data/big.bin
COPY text.txt /data/text.txt
";

/// Incompressible bytes, the same for the same seed.
fn noise(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// Log-like text of `len` bytes.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut n = 0u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        n += 1;
        out.extend_from_slice(
            format!(
                "2026-11-26T08:{:02}:{:02}Z line-3 sensor={} reading={}.{:03} status=ok seq={n}\n",
                (x >> 8) % 60,
                (x >> 16) % 60,
                (x >> 24) % 16,
                (x >> 32) % 1000,
                (x >> 40) % 1000
            )
            .as_bytes(),
        );
    }
    out.truncate(len);
    out
}

struct Push {
    build: String,
    reference: String,
    index: String,
    size: u64,
    uploaded: u64,
    summary: String,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let work = match &settings.work_dir {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let hub = BenchHub::start(&work.path().join("hub")).await?;
    let proxy = FaultProxy::start(hub.addr).await?;
    let agent = hub.joined_agent("edge", &work.path().join("agent")).await?;
    hub.stage_on_outpost("edge").await?;

    // The project: two layers, 3/4 incompressible, 1/4 text.
    let project = work.path().join("project");
    std::fs::create_dir_all(&project)?;
    let big_len = (settings.size * 3 / 4) as usize;
    let mut big = noise("big layer", big_len);
    std::fs::write(project.join("big.bin"), &big)?;
    std::fs::write(
        project.join("text.txt"),
        text((settings.size - big_len as u64) as usize),
    )?;
    std::fs::write(project.join("Dockerfile"), DOCKERFILE)?;
    std::fs::write(project.join("trellis.yaml"), MANIFEST)?;
    setup::run(&project, "git", &["init", "-q", "-b", "main"])?;
    setup::commit(&project, "first")?;

    eprintln!("pushing the first build…");
    let first = push(&settings, &hub, &proxy, work.path(), &project).await?;
    release(&hub, &first.build).await?;

    // Full first delivery against a plain download, same hub, same run.
    eprintln!(
        "timing {} full deliveries and plain downloads…",
        settings.runs
    );
    setup::route_agent(&agent, hub.addr)?;
    let plain_http = hub.agent_http(&agent)?;
    let mut chunked = Vec::new();
    let mut plain = Vec::new();
    let (mut chunked_cpu, mut plain_cpu) = (Vec::new(), Vec::new());
    for run in 0..settings.runs {
        let order = if run % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for chunked_first in order {
            if chunked_first {
                let cache = work.path().join(format!("cache-{run}"));
                let (started, cpu) = (Instant::now(), setup::cpu_seconds());
                deliver(&agent, &cache, &first.index).await?;
                chunked.push(started.elapsed().as_secs_f64());
                chunked_cpu.push(setup::cpu_seconds() - cpu);
            } else {
                let file = work.path().join(format!("plain-{run}"));
                let (started, cpu) = (Instant::now(), setup::cpu_seconds());
                let got = download(&plain_http, &hub, &first.index, &file).await?;
                plain.push(started.elapsed().as_secs_f64());
                plain_cpu.push(setup::cpu_seconds() - cpu);
                anyhow::ensure!(got == first.size, "the plain download got {got} bytes");
            }
        }
    }
    // Removed only now: ext4 makes new files slow to create right after
    // thousands were deleted, which would tax whichever run came next.
    for run in 0..settings.runs {
        let _ = std::fs::remove_dir_all(work.path().join(format!("cache-{run}")));
        let _ = std::fs::remove_file(work.path().join(format!("plain-{run}")));
    }

    // 1% of the image changed inside the big layer; pushed and delivered.
    let edit = (settings.size / 100) as usize;
    let at = big_len / 2;
    big[at..at + edit].copy_from_slice(&noise("the edit", edit));
    std::fs::write(project.join("big.bin"), &big)?;
    drop(big);
    setup::commit(&project, "change 1% of the big layer")?;
    eprintln!("pushing the second build…");
    let second = push(&settings, &hub, &proxy, work.path(), &project).await?;
    release(&hub, &second.build).await?;
    let cache = work.path().join("outpost-cache");
    deliver(&agent, &cache, &first.index).await?;
    setup::route_agent(&agent, proxy.addr())?;
    let before = proxy.stats().bytes_down;
    deliver(&agent, &cache, &second.index).await?;
    let delivered = proxy.stats().bytes_down - before;

    let size = second.size as f64;
    let pct = |bytes: u64| format!("{:.2}%", 100.0 * bytes as f64 / size);
    let chunked_s = median(chunked);
    let plain_s = median(plain);
    println!();
    println!(
        "artifacts: an image of {} (2 layers: {} incompressible, {} text); then {} of the big layer rewritten",
        mib(first.size),
        mib(big_len as u64),
        mib(settings.size - big_len as u64),
        mib(edit as u64)
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| first push: bytes uploaded | {} |", mib(first.uploaded));
    println!(
        "| second push: bytes uploaded | {} ({} of the image) |",
        mib(second.uploaded),
        pct(second.uploaded)
    );
    println!(
        "| second delivery: bytes fetched by the outpost | {} ({} of the image) |",
        mib(delivered),
        pct(delivered)
    );
    println!(
        "| full first delivery, chunked (median of {}) | {chunked_s:.2} s |",
        settings.runs
    );
    println!(
        "| plain HTTPS download of the same artifact (median of {}) | {plain_s:.2} s |",
        settings.runs
    );
    println!(
        "| full delivery ÷ plain download | {:.2}× |",
        chunked_s / plain_s
    );
    println!(
        "| CPU time (hub and outpost together), chunked / plain (medians) | {:.2} s / {:.2} s |",
        median(chunked_cpu),
        median(plain_cpu)
    );
    println!();
    println!("second push said: {}", second.summary);

    // The images stay on this machine's engine otherwise.
    for push in [&first, &second] {
        let _ = std::process::Command::new("podman")
            .args(["rmi", "--force", &push.reference])
            .output();
    }
    proxy.shutdown().await;
    Ok(())
}

/// `trellis push build` through the counting proxy.
async fn push(
    settings: &Settings,
    hub: &BenchHub,
    proxy: &FaultProxy,
    work: &Path,
    project: &Path,
) -> anyhow::Result<Push> {
    let before = proxy.stats().bytes_up;
    let output = setup::trellis(
        &settings.trellis,
        hub,
        proxy.addr(),
        &work.join("config"),
        project,
        &["push", "build", "-p", "bench"],
    )?;
    let uploaded = proxy.stats().bytes_up - before;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("uploaded "))
        .unwrap_or_default()
        .to_owned();
    let builds = hub
        .api(reqwest::Method::GET, "/projects/bench/builds", None)
        .await?;
    let build: &Value = builds
        .as_array()
        .and_then(|b| b.first())
        .context("the push recorded a build")?;
    let archive = &build["components"][0]["artifact"]["archive"];
    Ok(Push {
        build: build["name"].as_str().unwrap_or_default().to_owned(),
        reference: build["components"][0]["artifact"]["reference"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        index: archive["index"]
            .as_str()
            .context("the build carries the image")?
            .to_owned(),
        size: archive["size"].as_u64().unwrap_or_default(),
        uploaded,
        summary,
    })
}

async fn release(hub: &BenchHub, build: &str) -> anyhow::Result<()> {
    hub.api(
        reqwest::Method::POST,
        "/projects/bench/stages/line/releases",
        Some(json!({ "build": build })),
    )
    .await?;
    Ok(())
}

/// The agent's own delivery of artifact `index` into the cache at `dir`.
async fn deliver(
    agent: &std::sync::Arc<trellis_agent::AgentState>,
    dir: &Path,
    index: &str,
) -> anyhow::Result<()> {
    let store = ChunkStore::open(dir, Durability::Cache)?;
    HubArtifacts::new(agent.clone(), store)
        .fetch(index, &|_| {})
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.sentence()))?;
    Ok(())
}

/// A plain HTTPS download of the artifact's content into `file`.
async fn download(
    http: &reqwest::Client,
    hub: &BenchHub,
    index: &str,
    file: &Path,
) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let mut response = http
        .get(format!(
            "https://{}/api/v1/agent/artifacts/{index}/content",
            hub.addr
        ))
        .send()
        .await?
        .error_for_status()?;
    let mut out = tokio::fs::File::create(file).await?;
    let mut total = 0u64;
    while let Some(chunk) = response.chunk().await? {
        total += chunk.len() as u64;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok(total)
}
