//! Outpost URIs: get, rotate, validate; revoking an outpost.

use trellis_hub::api::types::{
    JoinTokenResponse, LinkProfileRequest, LinkProfileView, OutpostUriResponse,
    UpdateOutpostRequest, ValidateOutpostUriRequest,
};
use trellis_hub::link::status::StageStatus;
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

pub async fn update(
    client: &HubClient,
    name: &str,
    update: &UpdateOutpostRequest,
    profile: &LinkProfileRequest,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let changes_profile = profile.heartbeat.is_some()
        || profile.bandwidth.is_some()
        || profile.windows.is_some()
        || profile.timezone.is_some();
    let changes_record = update.display_name.is_some()
        || update.description.is_some()
        || update.ingress_domain.is_some();
    if changes_profile {
        // The profile first: a part that does not parse changes nothing.
        let view: LinkProfileView = client
            .patch(
                &format!("/outposts/{}/link-profile", seg(name)),
                profile,
                "changing the outpost's link profile",
            )
            .await?;
        if !changes_record {
            return print_link_profile(format, &view);
        }
    }
    let o: Outpost = client
        .patch(
            &format!("/outposts/{}", seg(name)),
            update,
            "changing the outpost",
        )
        .await?;
    output::one(
        format,
        &o,
        &[
            ("outpost", format!("{} ({})", o.name, o.display_name)),
            ("description", o.description.clone()),
            (
                "ingresses",
                format!("<host>.<stage>.<project>.{}", o.ingress_domain()),
            ),
        ],
    )?;
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
    let devices = d
        .agent
        .as_ref()
        .map(|a| device_lines(&a.devices))
        .filter(|s| !s.is_empty())
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
            ("devices", devices),
            (
                "ingresses",
                format!("<host>.<stage>.<project>.{}", d.ingress_domain),
            ),
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

pub fn print_join(join: &JoinTokenResponse) {
    println!(
        "join token for {} (one use, valid until {}):",
        join.outpost,
        output::time(&join.expires_at)
    );
    println!("{}", join.token);
    println!();
    println!(
        "install the agent on the outpost's host (as root; it downloads the agent from the hub and joins):"
    );
    println!("  {}", join.install_command);
    println!();
    println!("or, where the agent is on the host already:");
    println!("  {}", join.command);
}

pub async fn stage_status(
    client: &HubClient,
    project: &str,
    stage: &str,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let s: StageStatus = client
        .get(
            &format!(
                "/projects/{}/stages/{}/outpost-status",
                seg(project),
                seg(stage)
            ),
            "getting the stage's status",
        )
        .await?;
    let release = |n: Option<u64>| {
        n.map(|n| format!("release {n}"))
            .unwrap_or_else(|| "none".into())
    };
    let mut fields = vec![
        (
            "stage",
            format!("{}/{} on outpost {}", s.project, s.stage, s.outpost),
        ),
        (
            "link",
            format!(
                "{} since {}",
                serde_json::to_value(s.link.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                output::time(&s.link.since)
            ),
        ),
        (
            "last seen",
            s.link
                .last_seen
                .as_ref()
                .map(output::time)
                .unwrap_or_else(|| "never".into()),
        ),
        (
            "round trip",
            s.link
                .rtt_ms
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "agent",
            s.link.agent_version.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "sync",
            serde_json::to_value(s.sync.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        ),
        (
            "desired",
            format!(
                "revision {} ({})",
                s.sync.desired_revision,
                release(s.sync.desired_release)
            ),
        ),
        (
            "applied",
            format!(
                "revision {} ({})",
                s.sync.applied_revision,
                release(s.sync.applied_release)
            ),
        ),
    ];
    if let Some(why) = &s.link.attention {
        fields.push(("attention", why.clone()));
    }
    if let Some(reason) = &s.link.last_disconnect {
        fields.push(("last disconnect", reason.clone()));
    }
    if let Some(d) = &s.sync.delivery {
        let percent = if d.total == 0 {
            100.0
        } else {
            100.0 * d.fetched as f64 / d.total as f64
        };
        fields.push((
            "delivery",
            format!(
                "revision {}: {} of {} ({percent:.0}%), {}",
                d.revision,
                crate::output::bytes(d.fetched),
                crate::output::bytes(d.total),
                d.step
            ),
        ));
    }
    if let Some(back) = s.sync.rolled_back_to {
        fields.push((
            "rolled back to",
            if back == 0 {
                "nothing (no earlier release ran; the stage runs nothing)".into()
            } else {
                format!("release {back}")
            },
        ));
    }
    if let Some(message) = &s.sync.message {
        fields.push(("agent says", message.clone()));
    }
    for c in &s.components {
        let text = |key: &str| c.get(key).and_then(|v| v.as_str()).unwrap_or("-");
        let number = |key: &str| c.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        let mut line = format!(
            "{} {} ({}/{} running, {} restarts",
            text("name"),
            text("state"),
            number("running"),
            number("replicas"),
            number("restarts")
        );
        if let Some(code) = c.get("exit_code").and_then(|v| v.as_i64()) {
            line.push_str(&format!(", last exit code {code}"));
        }
        line.push(')');
        if let Some(message) = c.get("message").and_then(|v| v.as_str()) {
            line.push_str(&format!(": {message}"));
        }
        fields.push(("component", line));
    }
    for e in &s.errors {
        fields.push((
            "error",
            format!(
                "[{} {}] {} (x{}, first {}, last {}){}",
                e.source,
                e.code,
                e.message,
                e.count,
                output::time(&e.first_seen),
                output::time(&e.last_seen),
                if e.hint.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", e.hint)
                }
            ),
        ));
    }
    output::one(format, &s, &fields)
}

/// The offered devices: `camera: /dev/video0 (rw, exclusive); gpu: GPUs
/// nvidia.com/gpu=all`.
fn device_lines(devices: &[trellis_hub::outposts::DeviceFact]) -> String {
    devices
        .iter()
        .map(|d| {
            let what = if d.kind == "gpu" {
                format!("GPUs {}", d.gpus.join(", "))
            } else {
                d.path.clone()
            };
            let mut notes: Vec<&str> = Vec::new();
            if !d.access.is_empty() {
                notes.push(&d.access);
            }
            if d.exclusive {
                notes.push("exclusive");
            }
            match d.granted {
                Some(false) => notes.push("not granted to this project"),
                _ if d.restricted => notes.push("some projects only"),
                _ => {}
            }
            if notes.is_empty() {
                format!("{}: {what}", d.name)
            } else {
                format!("{}: {what} ({})", d.name, notes.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `trellis update outposts -l SELECTOR --agent-version V`.
pub async fn update_agents(
    client: &HubClient,
    request: &trellis_hub::api::agent_updates::CreateAgentUpdatesRequest,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let created: trellis_hub::api::agent_updates::CreatedAgentUpdates = client
        .post("/agent-updates", request, "asking for agent updates")
        .await?;
    if output::machine(format, &created)? {
        return Ok(());
    }
    let waves = created.updates.iter().map(|u| u.wave).max().unwrap_or(0) + 1;
    for u in &created.updates {
        let from = if u.from_version.is_empty() {
            "?"
        } else {
            &u.from_version
        };
        let mut line = format!(
            "updating outpost {} from agent {from} to {} (update {}",
            u.outpost, u.version, u.id
        );
        if waves > 1 {
            line.push_str(&format!(", wave {} of {waves}", u.wave + 1));
        }
        if u.carried {
            line.push_str(", offline: it updates when it links");
        }
        line.push(')');
        println!("{line}");
    }
    if !created.already.is_empty() {
        println!(
            "already at {}: {}",
            request.version,
            created.already.join(", ")
        );
    }
    eprintln!("follow them with `trellis list outposts`");
    Ok(())
}

/// The outpost's link profile, as `trellis get outpost` and `update
/// outpost` show it.
pub fn link_profile_lines(p: &LinkProfileView) -> Vec<(&'static str, String)> {
    let heartbeat = if p.heartbeat_default {
        format!("{} s (the hub's default)", p.heartbeat_secs)
    } else {
        format!("{} s", p.heartbeat_secs)
    };
    let delivery = match &p.opens {
        Some(opens) => format!("waiting for delivery window (opens {opens})"),
        None => "open".to_owned(),
    };
    vec![
        ("heartbeat", heartbeat),
        ("bandwidth", p.bandwidth.clone()),
        ("windows", format!("{} ({})", p.windows, p.timezone)),
        ("delivery", delivery),
    ]
}

fn print_link_profile(format: OutputFormat, view: &LinkProfileView) -> anyhow::Result<()> {
    let mut lines = vec![("outpost", view.outpost.clone())];
    lines.extend(link_profile_lines(view));
    output::one(format, view, &lines)?;
    Ok(())
}
