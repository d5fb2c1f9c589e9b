//! What runs on a stage: `start|stop|restart component`, `suspend|resume
//! stage`, `list component` and `logs`.

use std::io::Write;

use anyhow::{Context, bail};
use chrono::{SecondsFormat, Utc};
use trellis_hub::api::components::{MAX_TAIL, parse_since};
use trellis_hub::api::types::{ComponentActionResponse, ComponentView, StageComponents};
use trellis_hub::error::ErrorBody;
use trellis_hub::link::LinkState;
use trellis_link::protocol::{LogLine, LogStream};
use trellis_model::Stage;

use crate::cli::{ComponentTarget, GlobalArgs, LogArgs, LogsCommand, OutputFormat, StageTarget};
use crate::client::{ClientError, HubClient, seg};
use crate::output::{self, time};
use crate::settings;

fn stage_path(project: &str, stage: &str) -> String {
    format!("/projects/{}/stages/{}", seg(project), seg(stage))
}

/// `trellis start|stop|restart component NAME -p P -s S`.
pub async fn component(
    client: &HubClient,
    action: &str,
    target: ComponentTarget,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let ComponentTarget::Component {
        name,
        project,
        stage,
    } = target;
    let done: ComponentActionResponse = client
        .post(
            &format!(
                "{}/components/{}/{action}",
                stage_path(&project, &stage),
                seg(&name)
            ),
            &serde_json::json!({}),
            &format!("asking to {action} component {name}"),
        )
        .await?;
    if output::machine(format, &done)? {
        return Ok(());
    }
    let what = format!("component {name} of stage {stage}");
    if done.changed {
        let asked = match action {
            "start" => "start requested",
            "stop" => "stop requested",
            _ => "restart requested",
        };
        println!(
            "{what}: {asked} (desired revision {}); the outpost applies it as soon as its link \
             is up — `trellis list component -p {project} -s {stage}` shows when it has",
            done.desired_revision
        );
    } else {
        let already = if done.control.stopped {
            "stopped"
        } else {
            "not stopped"
        };
        println!("{what} is already {already}; nothing changed");
    }
    if done.stage_suspended {
        println!(
            "note: stage {stage} is suspended, so nothing runs until `trellis resume stage {stage} \
             -p {project}`"
        );
    }
    Ok(())
}

/// `trellis suspend|resume stage NAME -p P`.
pub async fn stage(
    client: &HubClient,
    suspend: bool,
    target: StageTarget,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let StageTarget::Stage { name, project } = target;
    let verb = if suspend { "suspend" } else { "resume" };
    let stage: Stage = client
        .post(
            &format!("{}/{verb}", stage_path(&project, &name)),
            &serde_json::json!({}),
            &format!("asking to {verb} stage {name}"),
        )
        .await?;
    if output::machine(format, &stage)? {
        return Ok(());
    }
    if suspend {
        println!(
            "stage {name} is suspended (desired revision {}); its components stop once the \
             outpost applies it. Releases and settings are kept; `trellis resume stage {name} -p \
             {project}` starts them again",
            stage.desired_revision
        );
    } else {
        println!(
            "stage {name} runs again (desired revision {}); its components start once the \
             outpost applies it",
            stage.desired_revision
        );
    }
    Ok(())
}

/// Where a component is reachable: the outpost's URLs when it reports
/// them, else its ingress hosts (the outpost serves no entry point, or has
/// not reported yet).
fn url_text(c: &ComponentView) -> String {
    if !c.observed.urls.is_empty() {
        c.observed.urls.join(" ")
    } else if c.hosts.is_empty() {
        "-".into()
    } else {
        c.hosts.join(" ")
    }
}

/// The devices a component holds, as the outpost reports them; while it
/// reports none, those its manifest asks for, marked as such.
fn devices_text(c: &ComponentView) -> String {
    if !c.observed.devices.is_empty() {
        c.observed.devices.join(" ")
    } else if c.devices.is_empty() {
        "-".into()
    } else {
        format!("({} asked)", c.devices.join(" "))
    }
}

/// `trellis list component -p P -s S`.
pub async fn list_components(
    client: &HubClient,
    project: &str,
    stage: &str,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let list: StageComponents = client
        .get(
            &format!("{}/components", stage_path(project, stage)),
            "listing the stage's components",
        )
        .await?;
    if output::machine(format, &list)? {
        return Ok(());
    }
    if list.release.is_none() {
        println!(
            "stage {stage} has no release yet, so it runs no components; push one with \
             `trellis push release -p {project} -s {stage}`"
        );
        return Ok(());
    }
    let detail = list
        .components
        .iter()
        .any(|c| c.observed.message.is_some() || c.observed.exit_code.is_some() || !c.in_release);
    let mut header = vec!["name", "state", "replicas", "restarts", "since", "release"];
    let reachable = list.components.iter().any(|c| !c.hosts.is_empty());
    if reachable {
        header.push("url");
    }
    let with_devices = list
        .components
        .iter()
        .any(|c| !c.devices.is_empty() || !c.observed.devices.is_empty());
    if with_devices {
        header.push("devices");
    }
    if detail {
        header.push("message");
    }
    output::list(format, &list.components, &header, |c| {
        let mut row = vec![
            c.name.clone(),
            state_text(c, list.suspended),
            if c.observed.state == "unknown" {
                "-".into()
            } else {
                format!("{}/{}", c.observed.running, c.observed.replicas)
            },
            c.observed.restarts.to_string(),
            c.observed
                .since
                .as_ref()
                .map(time)
                .unwrap_or_else(|| "-".into()),
            c.observed
                .release
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        ];
        if reachable {
            row.push(url_text(c));
        }
        if with_devices {
            row.push(devices_text(c));
        }
        if detail {
            row.push(message_text(c));
        }
        row
    })?;
    let observed = list
        .observed_at
        .as_ref()
        .map(time)
        .unwrap_or_else(|| "never".into());
    if matches!(
        list.link,
        LinkState::Offline | LinkState::Revoked | LinkState::AwaitingAgent
    ) {
        println!(
            "note: outpost {} is {}; states are as it last reported them ({observed})",
            list.outpost,
            link_word(list.link)
        );
    }
    if list.observed_at.is_none() {
        println!("note: the outpost has not reported this stage yet, so every state is unknown");
    } else if !list.current {
        println!(
            "note: the outpost has not reported desired revision {} yet (its last report, at \
             {observed}, was for revision {}); states may lag behind what was asked",
            list.desired_revision, list.reported_revision
        );
    }
    if list.reported_state.as_deref() == Some("failed") || list.rolled_back_to.is_some() {
        let back = match list.rolled_back_to {
            Some(0) => " (rolled back: no earlier release ran, so the stage runs nothing)".into(),
            Some(n) => format!(" (rolled back to release {n})"),
            None => String::new(),
        };
        println!(
            "note: the outpost reports the stage failed{back}: {}",
            list.reported_message
                .as_deref()
                .unwrap_or("no reason given")
        );
    }
    if list.suspended {
        println!(
            "note: stage {stage} is suspended; nothing runs until `trellis resume stage {stage} \
             -p {project}`"
        );
    }
    Ok(())
}

fn link_word(state: LinkState) -> &'static str {
    match state {
        LinkState::AwaitingAgent => "waiting for its agent to connect for the first time",
        LinkState::Online => "online",
        LinkState::Degraded => "online (degraded)",
        LinkState::Offline => "offline",
        LinkState::Revoked => "revoked",
    }
}

/// The observed state, with what was asked of it when the two differ.
fn state_text(c: &ComponentView, suspended: bool) -> String {
    let state = &c.observed.state;
    let running = !matches!(state.as_str(), "stopped" | "unknown" | "succeeded");
    if c.desired.stopped && running {
        format!("{state} (stop requested)")
    } else if !c.desired.stopped && !suspended && state == "stopped" {
        format!("{state} (start requested)")
    } else if c.desired.stopped && state == "unknown" {
        format!("{state} (stopped on request)")
    } else {
        state.clone()
    }
}

fn message_text(c: &ComponentView) -> String {
    let mut parts = Vec::new();
    if let Some(code) = c.observed.exit_code {
        parts.push(format!("exit code {code}"));
    }
    if let Some(m) = &c.observed.message {
        parts.push(m.clone());
    }
    if !c.in_release {
        parts.push("not in the stage's latest release".into());
    }
    parts.join("; ")
}

/// `trellis logs component|stage …`: streams the lines as they arrive.
pub async fn logs(global: &GlobalArgs, command: LogsCommand) -> anyhow::Result<()> {
    let (project, stage, component, args) = match command {
        LogsCommand::Component {
            name,
            project,
            stage,
            logs,
        } => (project, stage, Some(name), logs),
        LogsCommand::Stage {
            name,
            project,
            logs,
        } => (project, name, None, logs),
    };
    // Checked here too, so a typo is reported before anything is sent.
    let query = log_query(component.as_deref(), &args)?;
    let client = settings::client(global)?;
    let doing = match &component {
        Some(c) => format!("reading the logs of component {c}"),
        None => format!("reading the logs of stage {stage}"),
    };
    let mut resp = client
        .get_stream(
            &format!("{}/logs", stage_path(&project, &stage)),
            &query,
            &doing,
        )
        .await?;

    let format = global.output;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = resp.chunk().await.map_err(|e| ClientError::Server {
            doing: doing.clone(),
            message: format!("the stream of lines broke off: {e}"),
            hint: "retry; with --follow, --since picks up where it broke off".into(),
        })?;
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk);
        let mut out = std::io::stdout().lock();
        let mut written = Ok(());
        while let Some(at) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=at).collect();
            written = print_line(&mut out, &line[..line.len() - 1], format, &doing);
            if written.is_err() {
                break;
            }
        }
        // Followed lines must show up as they come, even through a pipe.
        if written.is_ok() {
            written = out.flush().map_err(anyhow::Error::from);
        }
        if let Err(e) = written {
            return match e.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
                // The reader went away (`trellis logs … | head`): done.
                Some(std::io::ErrorKind::BrokenPipe) => Ok(()),
                Some(_) => Err(e).context("writing the log lines to standard output"),
                None => Err(e),
            };
        }
    }
    if !buf.is_empty() {
        bail!(ClientError::Server {
            doing,
            message: "the stream of lines ended in the middle of a line".into(),
            hint: "retry".into(),
        });
    }
    Ok(())
}

/// The query string of a log request, checking `--since` and `--tail`.
fn log_query(
    component: Option<&str>,
    args: &LogArgs,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut query = Vec::new();
    if let Some(c) = component {
        query.push(("component", c.to_owned()));
    }
    if let Some(since) = &args.since {
        parse_since(since, Utc::now()).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
        query.push(("since", since.clone()));
    }
    if let Some(tail) = args.tail {
        if tail > MAX_TAIL {
            bail!("--tail {tail} is more than the {MAX_TAIL} lines the hub hands out at once");
        }
        query.push(("tail", tail.to_string()));
    }
    if args.follow {
        query.push(("follow", "true".into()));
    }
    Ok(query)
}

/// Prints one line of the hub's answer: a log line, or the error that
/// ended the stream.
/// `-o json` prints each line as the hub sent it (one JSON object per
/// line), `-o yaml` each as a YAML document of its own, so both can be
/// read while lines keep coming.
fn print_line(
    out: &mut impl Write,
    raw: &[u8],
    format: OutputFormat,
    doing: &str,
) -> anyhow::Result<()> {
    if let Ok(line) = serde_json::from_slice::<LogLine>(raw) {
        if format == OutputFormat::Json {
            out.write_all(raw)?;
            writeln!(out)?;
        } else if format == OutputFormat::Yaml {
            write!(out, "---\n{}", output::yaml(&line)?)?;
        } else {
            let marker = match line.stream {
                LogStream::Stdout => "",
                LogStream::Stderr => "! ",
            };
            writeln!(
                out,
                "{} {}[{}] {marker}{}",
                line.time.to_rfc3339_opts(SecondsFormat::Millis, true),
                line.component,
                line.replica,
                line.line
            )?;
        }
        return Ok(());
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(raw) {
        let _ = out.flush();
        bail!(ClientError::Unavailable {
            code: e.error.code,
            message: e.error.message,
            hint: e.error.hint,
        });
    }
    bail!(ClientError::Server {
        doing: doing.to_owned(),
        message: format!(
            "it sent a line that is not a log line: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        ),
        hint: "the hub and this command line may be of different versions".into(),
    })
}
