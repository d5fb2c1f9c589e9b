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
//! - the TLS key (`server.key`): each instance issues its own server
//!   certificate, for the same key, so the public-key pin an install
//!   command carries holds at every instance;
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

use trellis_link::identity::HubCa;

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
/// cluster: offers this instance's (made in memory if it has none) when the
/// store has none yet, takes the cluster's when the directory has none, and
/// refuses to go on when they differ. A file is written only once the
/// cluster's value is known, so a new instance's directory never holds a CA
/// or secret of its own, not even for a moment, that the cluster does not share.
pub async fn share(store: &dyn Store, data_dir: &Path, key: &ClusterKey) -> anyhow::Result<()> {
    let cert_path = data_dir.join(CA_CERT_FILE);
    let key_path = data_dir.join(CA_KEY_FILE);
    let own_ca = if cert_path.exists() {
        // Read through the hub's own loader, which says what is wrong with
        // a damaged pair.
        crate::tls::load_or_create_ca(data_dir)?;
        Some(SharedCa {
            cert_pem: std::fs::read_to_string(&cert_path)?,
            key_pem: std::fs::read_to_string(&key_path)?,
        })
    } else {
        None
    };
    let offer = match &own_ca {
        Some(ca) => serde_json::to_string(ca)?,
        None => {
            trellis_link::identity::install_crypto_provider();
            let ca = HubCa::generate("Trellis hub CA").context("creating the hub's CA")?;
            serde_json::to_string(&SharedCa {
                cert_pem: ca.cert_pem().to_owned(),
                key_pem: ca.key_pem(),
            })?
        }
    };
    let cluster_ca: SharedCa =
        serde_json::from_slice(&agree(store, key, data_dir, "ca", offer).await?)
            .context("the cluster's CA record is damaged")?;
    match own_ca {
        Some(own) if own.cert_pem.trim() != cluster_ca.cert_pem.trim() => {
            let fingerprint = |pem: &str| {
                HubCa::from_pem(pem, &cluster_ca.key_pem)
                    .map(|ca| ca.fingerprint().to_string())
                    .unwrap_or_else(|_| "unreadable".into())
            };
            bail!(
                "this instance's CA ({} in {}) is not the CA of the hubs sharing this database \
                 ({}): agents trust only one. Remove {CA_CERT_FILE} and {CA_KEY_FILE} from {} so \
                 this instance takes the cluster's, or point --store at this hub's own database",
                own_fingerprint(&own).unwrap_or_else(|| "unreadable".into()),
                data_dir.display(),
                fingerprint(&cluster_ca.cert_pem),
                data_dir.display()
            );
        }
        Some(_) => {}
        None => {
            // Key first: a CA certificate without its key would be unusable.
            crate::tls::write_file(&key_path, &cluster_ca.key_pem, 0o600)?;
            crate::tls::write_file(&cert_path, &cluster_ca.cert_pem, 0o644)?;
        }
    }

    let secret_path = data_dir.join(crate::LINK_SECRET_FILE);
    share_key(store, key, data_dir, "link-secret", &secret_path, |path| {
        LinkSecret::load_or_create(path).map(drop)
    })
    .await?;
    let config_path = data_dir.join(crate::sealed::CONFIG_KEY_FILE);
    share_key(store, key, data_dir, "config-key", &config_path, |path| {
        trellis_agent::seal::SealKey::load_or_create(path)
            .map(drop)
            .with_context(|| format!("reading the config key {}", path.display()))
    })
    .await?;
    // The TLS key: every instance serves the same public key, so the pin in
    // an install command (`trellis create outpost`) holds whichever
    // instance answers. A new instance offers a fresh key if none is shared.
    let tls_key_path = data_dir.join(crate::tls::SERVER_KEY_FILE);
    if !tls_key_path.exists() {
        let fresh = HubCa::new_server_key().context("creating the hub's TLS key")?;
        let cluster = String::from_utf8(agree(store, key, data_dir, "tls-key", fresh).await?)
            .context("the cluster's TLS key record is damaged")?;
        crate::tls::write_file(&tls_key_path, &cluster, 0o600)?;
        return Ok(());
    }
    share_key(store, key, data_dir, "tls-key", &tls_key_path, |path| {
        crate::tls::load_or_create_server_key(path.parent().unwrap_or(path)).map(drop)
    })
    .await
}

/// Offers `offer` as the cluster's secret `name` and returns the cluster's
/// (the offer, if it was the first).
async fn agree(
    store: &dyn Store,
    key: &ClusterKey,
    data_dir: &Path,
    name: &str,
    offer: String,
) -> anyhow::Result<Vec<u8>> {
    let stored = store
        .cluster_secret(name, &key.seal(name, offer.as_bytes()))
        .await
        .with_context(|| {
            let what = if name == "ca" {
                "CA"
            } else {
                &name.replace('-', " ")
            };
            format!("sharing the hub's {what} with the other instances")
        })?;
    key.open(name, &stored).ok_or_else(|| wrong_key(data_dir))
}

/// Shares a 256-bit key kept in hexadecimal at `path` (the link secret, the
/// config key): this directory's, read with `check` so a damaged file is
/// named, or 256 new random bits; written only once the cluster's is known.
async fn share_key(
    store: &dyn Store,
    key: &ClusterKey,
    data_dir: &Path,
    name: &str,
    path: &Path,
    check: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let own = if path.exists() {
        check(path)?;
        Some(std::fs::read_to_string(path)?.trim().to_owned())
    } else {
        None
    };
    let offer = own
        .clone()
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 32]>()));
    // "link-secret" → "link secret", for messages.
    let what = name.replace('-', " ");
    let cluster = String::from_utf8(agree(store, key, data_dir, name, offer).await?)
        .with_context(|| format!("the cluster's {what} record is damaged"))?;
    match own {
        Some(own) if own != cluster.trim() => bail!(
            "this instance's {what} ({}) is not the one of the hubs sharing this database: {}. \
             Remove it so this instance takes the cluster's, or point --store at this hub's own \
             database",
            path.display(),
            match name {
                "config-key" => "it could not open the config values the others sealed",
                "tls-key" => "install commands printed by one instance would not reach the others",
                _ => "Outpost URIs and console sessions would not work across instances",
            }
        ),
        Some(_) => Ok(()),
        None => crate::tls::write_file(path, &format!("{}\n", cluster.trim()), 0o600),
    }
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
