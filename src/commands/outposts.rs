//! Outpost URIs: get, rotate, validate; revoking an outpost.

use trellis_hub::api::types::{OutpostUriResponse, ValidateOutpostUriRequest};
use trellis_hub::outposts::OutpostDescription;
use trellis_model::Outpost;

use crate::cli::OutputFormat;
use crate::client::{HubClient, seg};
use crate::output;

pub async fn get_uri(client: &HubClient, outpost: &str) -> anyhow::Result<()> {
    let r: OutpostUriResponse = client
        .get(
            &format!("/outposts/{}/uri", seg(outpost)),
            "getting the Outpost URI",
        )
        .await?;
    println!("{}", r.uri);
    Ok(())
}

pub async fn rotate(client: &HubClient, outpost: &str) -> anyhow::Result<()> {
    let r: OutpostUriResponse = client
        .post(
            &format!("/outposts/{}/uri/rotate", seg(outpost)),
            &serde_json::json!({}),
            "rotating the Outpost URI",
        )
        .await?;
    eprintln!(
        "the previous URI of {} no longer validates; stages already on it keep working",
        r.outpost
    );
    println!("{}", r.uri);
    Ok(())
}

pub async fn revoke(client: &HubClient, name: &str) -> anyhow::Result<()> {
    let o: Outpost = client
        .post(
            &format!("/outposts/{}/revoke", seg(name)),
            &serde_json::json!({}),
            "revoking the outpost",
        )
        .await?;
    println!(
        "revoked outpost {}; its URI no longer validates and it takes no new stages",
        o.name
    );
    Ok(())
}

pub async fn validate(
    client: &HubClient,
    uri: &str,
    project: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let d: OutpostDescription = client
        .post(
            "/outposts/validate",
            &ValidateOutpostUriRequest {
                uri: uri.to_owned(),
                project,
            },
            "validating the Outpost URI",
        )
        .await?;
    let agent = match &d.agent {
        Some(a) => format!("{} on {}/{}", a.version, a.os, a.arch),
        None => "not connected yet".into(),
    };
    let runtimes = d
        .agent
        .as_ref()
        .map(|a| {
            a.runtimes
                .iter()
                .map(|r| format!("{} {}", r.name, r.version))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    let capacity = d
        .agent
        .as_ref()
        .map(|a| {
            format!(
                "{} CPUs, {} MiB memory, {} MiB free disk",
                a.cpus,
                a.memory_bytes >> 20,
                a.disk_free_bytes >> 20
            )
        })
        .unwrap_or_else(|| "-".into());
    output::one(
        format,
        &d,
        &[
            ("outpost", format!("{} ({})", d.name, d.display_name)),
            ("description", d.description.clone()),
            (
                "labels",
                d.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "link",
                format!("{} since {}", d.link.state, output::time(&d.link.since)),
            ),
            (
                "last seen",
                d.link
                    .last_seen
                    .as_ref()
                    .map(output::time)
                    .unwrap_or_else(|| "never".into()),
            ),
            ("agent", agent),
            ("runtimes", runtimes),
            ("capacity", capacity),
            (
                "stages",
                format!(
                    "{} of {}",
                    d.stage_count,
                    d.max_stages
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "no limit".into())
                ),
            ),
            (
                "your stages",
                if d.your_stages.is_empty() {
                    "-".into()
                } else {
                    d.your_stages.join(", ")
                },
            ),
        ],
    )
}
