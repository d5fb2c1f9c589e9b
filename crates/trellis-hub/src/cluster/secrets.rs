//! What every hub instance sharing a store must agree on, kept in the
//! store sealed with the **cluster key**, so that a new instance needs one
//! command and one secret to join:
//!
//! - the CA (`ca.pem`, `ca.key`): agents trust exactly one, and each
//!   instance issues their certificates and its own server certificate
//!   with it;
//! - the link secret (`link.secret`): Outpost URI keys are derived from it,
//!   and so is the console's session key (a session signed by one instance
//!   is accepted by the others), and the key instances sign forwarded
//!   requests with ([`super::forward`]);
//! - the config key (`config.key`): every config value is sealed with it in
//!   the store ([`crate::sealed`]), so an instance with another key could
//!   not open what the others wrote.
//!
//! The first instance on a database offers its own (created at first start,
//! or those of the hub `trellis hub migrate` copied — its config key must
//! come along, since the values it copied are sealed with it); later instances
//! receive them and write them into their data directory, where the rest
//! of the hub reads them as a single hub does. An instance whose data
//! directory already holds a different CA, link secret or config key refuses
//! to start, naming both: running it would hand agents two CAs (or leave
//! config values nobody can open).
//!
//! The cluster key is 256 random bits, given as `TRELLIS_CLUSTER_KEY` (64
//! hexadecimal characters) or kept in `<data>/cluster.key`; the first
//! instance makes one if it has none. Sealing is ChaCha20-Poly1305 under a
//! key derived from it (BLAKE3), with the secret's name as associated data,
//! so the database alone reveals neither the CA's key nor the link secret.

use std::path::Path;

use anyhow::{Context, bail};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use trellis_store::Store;

use crate::outposts::LinkSecret;
use crate::tls::{CA_CERT_FILE, CA_KEY_FILE};

/// The file in the data directory that holds the cluster key.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";

/// The environment variable that gives the cluster key.
pub const CLUSTER_KEY_ENV: &str = "TRELLIS_CLUSTER_KEY";

/// 256 bits that open the secrets every instance shares.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

impl ClusterKey {
    pub fn parse(text: &str) -> anyhow::Result<ClusterKey> {
        hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(ClusterKey)
            .context(
                "a cluster key is 64 hexadecimal characters (as in another instance's cluster.key)",
            )
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key given in `TRELLIS_CLUSTER_KEY`, else the one in
    /// `<data>/cluster.key`, else a new one written there. The flag says
    /// whether it was made now.
    pub fn find_or_create(data_dir: &Path) -> anyhow::Result<(ClusterKey, bool)> {
        if let Ok(text) = std::env::var(CLUSTER_KEY_ENV) {
            return Ok((
                ClusterKey::parse(&text).with_context(|| format!("reading {CLUSTER_KEY_ENV}"))?,
                false,
            ));
        }
        let path = data_dir.join(CLUSTER_KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok((
                ClusterKey::parse(&text).with_context(|| format!("reading {}", path.display()))?,
                false,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ClusterKey(rand::random());
                crate::tls::write_file(&path, &format!("{}\n", key.to_hex()), 0o600)?;
                Ok((key, true))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn aead(&self) -> LessSafeKey {
        let derived = blake3::derive_key("trellis cluster secrets v1", &self.0);
        // A 32-byte key is what ChaCha20-Poly1305 takes.
        LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &derived)
                .expect("ChaCha20-Poly1305 takes 32-byte keys"),
        )
    }

    /// Seals `value` as secret `name`: `v1.<nonce hex>.<ciphertext hex>`.
    fn seal(&self, name: &str, value: &[u8]) -> String {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut sealed = value.to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .expect("sealing a few kilobytes cannot fail");
        format!("v1.{}.{}", hex::encode(nonce), hex::encode(sealed))
    }

    /// Opens secret `name`; `None` if this key did not seal it.
    fn open(&self, name: &str, sealed: &str) -> Option<Vec<u8>> {
        let mut parts = sealed.split('.');
        if parts.next()? != "v1" {
            return None;
        }
        let nonce = <[u8; NONCE_LEN]>::try_from(hex::decode(parts.next()?).ok()?).ok()?;
        let mut data = hex::decode(parts.next()?).ok()?;
        let plain = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SharedCa {
    cert_pem: String,
    key_pem: String,
}

fn wrong_key(data_dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "the hubs sharing this database sealed their secrets with another cluster key; \
         start this instance with {CLUSTER_KEY_ENV} set to the key in the first instance's \
         data directory ({CLUSTER_KEY_FILE}), or copy that file to {}",
        data_dir.join(CLUSTER_KEY_FILE).display()
    )
}

/// Makes the data directory's CA, link secret and config key those of the
/// cluster: offers this instance's (creating them if it has none) when the store
/// has none yet, takes the cluster's when the directory has none, and
/// refuses to go on when they differ.
pub async fn share(store: &dyn Store, data_dir: &Path, key: &ClusterKey) -> anyhow::Result<()> {
    let cert_path = data_dir.join(CA_CERT_FILE);
    let key_path = data_dir.join(CA_KEY_FILE);
    let secret_path = data_dir.join(crate::LINK_SECRET_FILE);
    // What this directory offers: its own CA and link secret if it has
    // them, else new ones (replaced by the cluster's below if there are
    // any already).
    let had_ca = cert_path.exists();
    let had_secret = secret_path.exists();
    crate::tls::load_or_create_ca(data_dir)?;
    let own_ca = SharedCa {
        cert_pem: std::fs::read_to_string(&cert_path)?,
        key_pem: std::fs::read_to_string(&key_path)?,
    };
    LinkSecret::load_or_create(&secret_path)?;
    let own_secret = std::fs::read_to_string(&secret_path)?.trim().to_owned();

    let offer = key.seal("ca", serde_json::to_string(&own_ca)?.as_bytes());
    let stored = store
        .cluster_secret("ca", &offer)
        .await
        .context("sharing the hub's CA with the other instances")?;
    let cluster_ca: SharedCa =
        serde_json::from_slice(&key.open("ca", &stored).ok_or_else(|| wrong_key(data_dir))?)
            .context("the cluster's CA record is damaged")?;
    if cluster_ca.cert_pem.trim() != own_ca.cert_pem.trim() {
        if had_ca {
            let fingerprint = |pem: &str| {
                trellis_link::identity::HubCa::from_pem(pem, &cluster_ca.key_pem)
                    .map(|ca| ca.fingerprint().to_string())
                    .unwrap_or_else(|_| "unreadable".into())
            };
            bail!(
                "this instance's CA ({} in {}) is not the CA of the hubs sharing this database \
                 ({}): agents trust only one. Remove {CA_CERT_FILE} and {CA_KEY_FILE} from {} so \
                 this instance takes the cluster's, or point --store at this hub's own database",
                own_fingerprint(&own_ca).unwrap_or_else(|| "unreadable".into()),
                data_dir.display(),
                fingerprint(&cluster_ca.cert_pem),
                data_dir.display()
            );
        }
        crate::tls::write_file(&key_path, &cluster_ca.key_pem, 0o600)?;
        crate::tls::write_file(&cert_path, &cluster_ca.cert_pem, 0o644)?;
    }

    let offer = key.seal("link-secret", own_secret.as_bytes());
    let stored = store
        .cluster_secret("link-secret", &offer)
        .await
        .context("sharing the hub's link secret with the other instances")?;
    let cluster_secret = String::from_utf8(
        key.open("link-secret", &stored)
            .ok_or_else(|| wrong_key(data_dir))?,
    )
    .context("the cluster's link secret record is damaged")?;
    if cluster_secret != own_secret {
        if had_secret {
            bail!(
                "this instance's link secret ({}) is not the one of the hubs sharing this \
                 database: Outpost URIs and console sessions would not work across instances. \
                 Remove it so this instance takes the cluster's, or point --store at this hub's \
                 own database",
                secret_path.display()
            );
        }
        crate::tls::write_file(&secret_path, &cluster_secret, 0o600)?;
    }

    let config_path = data_dir.join(crate::sealed::CONFIG_KEY_FILE);
    let had_config = config_path.exists();
    trellis_agent::seal::SealKey::load_or_create(&config_path)
        .with_context(|| format!("reading the config key {}", config_path.display()))?;
    let own_config = std::fs::read_to_string(&config_path)?.trim().to_owned();
    let offer = key.seal("config-key", own_config.as_bytes());
    let stored = store
        .cluster_secret("config-key", &offer)
        .await
        .context("sharing the hub's config key with the other instances")?;
    let cluster_config = String::from_utf8(
        key.open("config-key", &stored)
            .ok_or_else(|| wrong_key(data_dir))?,
    )
    .context("the cluster's config key record is damaged")?;
    if cluster_config != own_config {
        if had_config {
            bail!(
                "this instance's config key ({}) is not the one of the hubs sharing this \
                 database: it could not open the config values the others sealed. Remove it \
                 so this instance takes the cluster's, or point --store at this hub's own \
                 database",
                config_path.display()
            );
        }
        crate::tls::write_file(&config_path, &format!("{cluster_config}\n"), 0o600)?;
    }
    Ok(())
}

fn own_fingerprint(ca: &SharedCa) -> Option<String> {
    trellis_link::identity::HubCa::from_pem(&ca.cert_pem, &ca.key_pem)
        .ok()
        .map(|ca| ca.fingerprint().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_with_the_same_key_and_name() {
        let key = ClusterKey(rand::random());
        let sealed = key.seal("ca", b"the ca");
        assert_eq!(key.open("ca", &sealed).unwrap(), b"the ca");
        assert!(
            key.open("link-secret", &sealed).is_none(),
            "bound to its name"
        );
        let other = ClusterKey(rand::random());
        assert!(other.open("ca", &sealed).is_none());
        assert!(key.open("ca", "v1.zz.zz").is_none());
        assert!(key.open("ca", "garbage").is_none());
        let parsed = ClusterKey::parse(&key.to_hex()).unwrap();
        assert_eq!(parsed.open("ca", &sealed).unwrap(), b"the ca");
        assert!(ClusterKey::parse("short").is_err());
    }
}
