//! `trellis upload agent-binary`, `trellis list agent-binaries`, `trellis
//! delete agent-binary VERSION/ARCH`.

use std::path::Path;

use anyhow::{Context, bail};
use trellis_model::AgentBinary;
use trellis_model::agent_binary::{check_arch, check_version, elf_arch};
use trellis_model::display::bytes;

use crate::cli::OutputFormat;
use crate::client::{HubClient, seg};
use crate::output::{self, time};

pub async fn upload(
    client: &HubClient,
    file: &Path,
    version: &str,
    arch: Option<&str>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    check_version(version)?;
    let content = tokio::fs::read(file)
        .await
        .with_context(|| format!("reading the agent binary {}", file.display()))?;
    // Read here too, so a wrong file is named before it is sent.
    let built_for = elf_arch(&content)
        .map_err(|e| anyhow::anyhow!("{} is not an agent binary: {e}", file.display()))?;
    let arch = match arch {
        Some(arch) => {
            check_arch(arch)?;
            if arch != built_for {
                bail!(
                    "{} is built for {built_for}, not {arch} (its ELF header says so); leave out --arch to upload it as {built_for}",
                    file.display()
                );
            }
            arch
        }
        None => built_for,
    };
    let binary: AgentBinary = client
        .put_bytes(
            &format!("/agent-binaries/{}/{}", seg(version), seg(arch)),
            content,
            &format!("uploading agent binary {version} for {arch}"),
        )
        .await?;
    output::one(format, &binary, &fields(&binary))
}

fn fields(b: &AgentBinary) -> Vec<(&'static str, String)> {
    vec![
        ("version", b.version.clone()),
        ("arch", b.arch.clone()),
        ("size", bytes(b.size)),
        ("blake3", b.blake3.clone()),
        ("sha256", b.sha256.clone()),
        ("manifest", b.manifest.clone()),
        ("uploaded", time(&b.uploaded_at)),
        ("uploaded by", b.uploaded_by.clone()),
    ]
}

pub async fn list(client: &HubClient, format: OutputFormat) -> anyhow::Result<()> {
    let items: Vec<AgentBinary> = client
        .get("/agent-binaries", "listing agent binaries")
        .await?;
    output::list(
        format,
        &items,
        &["version", "arch", "size", "blake3", "uploaded", "by"],
        |b| {
            vec![
                b.version.clone(),
                b.arch.clone(),
                bytes(b.size),
                b.blake3.chars().take(16).collect(),
                time(&b.uploaded_at),
                b.uploaded_by.clone(),
            ]
        },
    )
}

/// `name` is `VERSION/ARCH`.
pub async fn delete(client: &HubClient, name: &str) -> anyhow::Result<()> {
    let Some((version, arch)) = name.split_once('/') else {
        bail!(
            "name the agent binary as VERSION/ARCH, e.g. 0.1.0/x86_64 (`trellis list agent-binaries` shows them)"
        );
    };
    client
        .delete(
            &format!("/agent-binaries/{}/{}", seg(version), seg(arch)),
            &format!("deleting agent binary {name}"),
        )
        .await?;
    println!("deleted agent binary {name}");
    Ok(())
}
