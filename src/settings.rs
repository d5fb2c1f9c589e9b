//! Where the command line finds its hub and key: flags, then environment
//! (both handled by clap), then what `trellis login` saved.

use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::GlobalArgs;
use crate::client::HubClient;

/// What `trellis login` remembers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedLogin {
    pub endpoint: String,
    pub key: String,
    /// The hub CA's certificate, when the hub uses its own CA.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
}

/// `$TRELLIS_CONFIG_DIR`, else `$XDG_CONFIG_HOME/trellis`, else
/// `~/.config/trellis`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TRELLIS_CONFIG_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("trellis"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config").join("trellis"))
}

fn login_file() -> Option<PathBuf> {
    config_dir().map(|d| d.join("login.json"))
}

pub fn load_saved() -> Option<SavedLogin> {
    let text = std::fs::read_to_string(login_file()?).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn save(login: &SavedLogin) -> anyhow::Result<PathBuf> {
    let path = login_file()
        .context("cannot tell where to save the login: set HOME or TRELLIS_CONFIG_DIR")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let tmp = path.with_extension("tmp");
    let file = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    serde_json::to_writer_pretty(&file, login)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Resolves endpoint and key and builds the client. The key may be absent
/// (the hub will then say what is missing).
pub fn client(global: &GlobalArgs) -> anyhow::Result<HubClient> {
    let (endpoint, key, ca_cert) = resolve(global)?;
    HubClient::new(&endpoint, key, ca_cert.as_deref())
}

/// The endpoint, key and CA certificate from flags, environment or the
/// saved login.
pub fn resolve(global: &GlobalArgs) -> anyhow::Result<(String, Option<String>, Option<PathBuf>)> {
    let saved = load_saved();
    let endpoint = global
        .endpoint
        .clone()
        .or_else(|| saved.as_ref().map(|s| s.endpoint.clone()))
        .context(
            "no hub given: pass --endpoint URL, set TRELLIS_ENDPOINT, or run `trellis login` once",
        )?;
    let key = global
        .key
        .clone()
        .or_else(|| saved.as_ref().map(|s| s.key.clone()));
    let ca_cert = global
        .ca_cert
        .clone()
        .or_else(|| saved.and_then(|s| s.ca_cert));
    Ok((endpoint, key, ca_cert))
}
