//! `trellis-agent install` (and `trellis agent install`): makes this host an
//! outpost from a binary already on it — joins the hub with a join token,
//! copies the binary into place, writes the systemd unit, and enables and
//! starts it where systemd runs.
//!
//! The hub's install script (`GET /install`) downloads the agent and runs
//! this command, so the unit file has one source, [`unit_file`].
//!
//! Order matters for "nothing half-installed": the join comes first (it
//! spends the one-time token and is what most often fails: a mistyped,
//! used or expired token, a hub out of reach); only once it succeeded are
//! the binary and the unit put in place. A failed join removes the data
//! directory if this command created it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use trellis_link::identity::JoinToken;

/// The unit's name.
pub const UNIT_NAME: &str = "trellis-agent.service";
/// Where the binary goes under the prefix.
pub const BINARY_NAME: &str = "trellis-agent";
/// The default install prefix (the binary goes to `<prefix>/bin`).
pub const DEFAULT_PREFIX: &str = "/usr/local";
/// The default data directory of an installed agent.
pub const DEFAULT_DATA: &str = "/var/lib/trellis-agent";
/// The default directory of the unit file.
pub const DEFAULT_UNIT_DIR: &str = "/etc/systemd/system";

/// The systemd unit of an agent installed at `binary` with its data in
/// `data`. `KillMode=process`: stopping or restarting the agent (an update,
/// a crash) stops the agent's own process only, so the components it
/// started keep running and the next agent adopts them.
pub fn unit_file(binary: &Path, data: &Path) -> String {
    format!(
        "[Unit]
Description=Trellis Outpost Agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={binary} run --data {data}
Environment=TRELLIS_LOG=info
Restart=always
RestartSec=5
# Components outlive the agent: only the agent's process is stopped, and
# the next agent adopts what runs.
KillMode=process
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
",
        binary = binary.display(),
        data = data.display(),
    )
}

/// What `install` is asked to do.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The hub's URL; must be the token's (`None`: the token's).
    pub hub: Option<String>,
    pub token: String,
    pub prefix: PathBuf,
    pub data: PathBuf,
    pub unit_dir: PathBuf,
    /// Write everything but do not enable or start the unit.
    pub no_start: bool,
}

/// Whether systemd manages this host (the test `sd_booted(3)` makes).
pub fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

pub async fn install(options: &InstallOptions) -> anyhow::Result<()> {
    let token: JoinToken = options
        .token
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("reading the join token (nothing was installed)")?;
    if let Some(hub) = &options.hub
        && hub.trim_end_matches('/') != token.hub_url.trim_end_matches('/')
    {
        bail!(
            "the join token is for the hub at {}, not {hub} (nothing was installed); use the command `trellis create outpost` printed",
            token.hub_url
        );
    }
    let source = std::env::current_exe().context("finding this agent's own executable")?;
    let binary = options.prefix.join("bin").join(BINARY_NAME);
    let unit = options.unit_dir.join(UNIT_NAME);
    if !options.unit_dir.is_dir() {
        bail!(
            "{} does not exist (nothing was installed); give the directory for systemd units with --unit-dir",
            options.unit_dir.display()
        );
    }

    let created_data = !options.data.exists();
    let identity = match crate::join(&token, &options.data).await {
        Ok(identity) => identity,
        Err(e) => {
            if created_data {
                let _ = std::fs::remove_dir_all(&options.data);
            }
            let hint = e.hint().map(|h| format!("\nhint: {h}")).unwrap_or_default();
            bail!("joining the hub failed, so nothing was installed: {e}{hint}");
        }
    };
    println!(
        "joined the hub at {} as outpost {}; identity in {}",
        identity.hub_url,
        identity.outpost,
        options.data.display()
    );

    place_binary(&source, &binary)?;
    write_file(&unit, unit_file(&binary, &options.data).as_bytes(), 0o644)
        .with_context(|| format!("writing the unit {}", unit.display()))?;
    println!("installed {} and {}", binary.display(), unit.display());

    if options.no_start {
        println!("start it with: systemctl enable --now {UNIT_NAME}");
        return Ok(());
    }
    if !systemd_runs() {
        println!(
            "systemd does not run on this host; start the agent with: {} run --data {} (as the unit's ExecStart does)",
            binary.display(),
            options.data.display()
        );
        return Ok(());
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", "--now", UNIT_NAME])?;
    println!("the agent runs as {UNIT_NAME} (journalctl -u {UNIT_NAME} shows its log)");
    Ok(())
}

/// Copies the running binary to `target` (atomically: a temporary file
/// beside it, renamed over), unless it runs from there already.
fn place_binary(source: &Path, target: &Path) -> anyhow::Result<()> {
    if let (Ok(a), Ok(b)) = (source.canonicalize(), target.canonicalize())
        && a == b
    {
        return Ok(());
    }
    let dir = target
        .parent()
        .context("the binary's target has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{BINARY_NAME}.new"));
    std::fs::copy(source, &tmp)
        .with_context(|| format!("copying {} to {}", source.display(), tmp.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", tmp.display()))?;
    std::fs::rename(&tmp, target)
        .with_context(|| format!("moving the agent into place at {}", target.display()))?;
    Ok(())
}

/// Writes `content` to `path` atomically (a temporary file renamed over).
fn write_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .with_context(|| format!("running systemctl {}", args.join(" ")))?;
    if !status.success() {
        bail!(
            "systemctl {} failed ({status}); the agent is installed and joined — see `systemctl status {UNIT_NAME}`",
            args.join(" ")
        );
    }
    Ok(())
}
