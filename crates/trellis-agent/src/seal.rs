//! Sealing what must not lie in the clear on disk: config values (env
//! values and files, passwords and tokens among them) in the agent's state
//! and saved plans, and in the hub's store.
//!
//! ChaCha20-Poly1305 (ring) with a 256-bit key kept in a file of its own
//! (mode 0600) beside the data it protects but outside it — `state.key` in
//! the agent's data directory, `config.key` in the hub's — and a random
//! 96-bit nonce per sealing. The additional data binds a sealed value to
//! where it belongs, so it cannot be moved elsewhere unnoticed. Losing the
//! key makes what it sealed unreadable: the key is backed up with the data.

use std::io;
use std::path::Path;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;

/// A sealing key.
pub struct SealKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(…)")
    }
}

/// Why sealed bytes could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "sealed data could not be opened: it was sealed with another key or changed since; \
     restore the key file it was sealed with from the backup of the data directory"
)]
pub struct OpenError;

impl SealKey {
    /// A key from its bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> SealKey {
        // A 32-byte key is exactly what ChaCha20-Poly1305 takes, so ring
        // cannot refuse it.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .unwrap_or_else(|_| unreachable!("a 32-byte ChaCha20-Poly1305 key is always valid"));
        SealKey {
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// The key kept in `path` (hexadecimal), made and written (0600,
    /// atomically) if the file does not exist yet.
    pub fn load_or_create(path: &Path) -> io::Result<SealKey> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; KEY_LEN]>::try_from(b).ok())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "{} is not a sealing key (64 hexadecimal characters); restore \
                                 it from the backup of the data directory",
                                path.display()
                            ),
                        )
                    })?;
                Ok(SealKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| io::Error::other("the system's random source failed"))?;
                write_private(path, &hex::encode(bytes))?;
                Ok(SealKey::from_bytes(&bytes))
            }
            Err(e) => Err(e),
        }
    }

    /// `plaintext` sealed: the nonce, then the ciphertext and its tag.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        if self.rng.fill(&mut nonce).is_err() {
            // The system's random source does not fail on any platform
            // this runs on; should it, a fixed nonce must never be used.
            panic!("the system's random source failed while sealing data");
        }
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        // Sealing fails only for inputs beyond ~256 GiB.
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .is_err()
        {
            panic!("data too large to seal");
        }
        out.extend_from_slice(&body);
        out
    }

    /// The plaintext of what [`SealKey::seal`] made with the same `aad`.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < NONCE_LEN {
            return Err(OpenError);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError)?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .map_err(|_| OpenError)?;
        Ok(plain.to_vec())
    }
}

/// Writes `text` to `path` readable by its owner only, beside and renamed,
/// so the file is either absent or whole.
fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Bytes marked as sealed: this prefix, then [`SealKey::seal`]'s output.
/// Bytes without it were written before sealing and are read as they are.
pub const SEALED_PREFIX: &[u8] = b"trellis-sealed-v1\0";

/// `plaintext` sealed and marked.
pub fn seal_marked(key: &SealKey, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut out = SEALED_PREFIX.to_vec();
    out.extend_from_slice(&key.seal(plaintext, aad));
    out
}

/// What [`seal_marked`] made, opened; bytes without the mark as they are.
pub fn open_marked(key: &SealKey, bytes: &[u8], aad: &[u8]) -> Result<Vec<u8>, OpenError> {
    match bytes.strip_prefix(SEALED_PREFIX) {
        Some(sealed) => key.open(sealed, aad),
        None => Ok(bytes.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_with_its_key_and_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.key");
        let key = SealKey::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let sealed = seal_marked(&key, b"hunter2", b"shop/dev");
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_ne!(
            sealed,
            seal_marked(&key, b"hunter2", b"shop/dev"),
            "a fresh nonce each time"
        );
        assert_eq!(open_marked(&key, &sealed, b"shop/dev").unwrap(), b"hunter2");
        assert_eq!(open_marked(&key, &sealed, b"shop/prod"), Err(OpenError));
        // The same key again from its file; another key cannot open it.
        let again = SealKey::load_or_create(&path).unwrap();
        assert_eq!(
            open_marked(&again, &sealed, b"shop/dev").unwrap(),
            b"hunter2"
        );
        let other = SealKey::from_bytes(&[7; KEY_LEN]);
        assert_eq!(open_marked(&other, &sealed, b"shop/dev"), Err(OpenError));
        // Changed bytes, or too few, do not open.
        let mut bent = sealed.clone();
        let last = bent.len() - 1;
        bent[last] ^= 1;
        assert_eq!(open_marked(&key, &bent, b"shop/dev"), Err(OpenError));
        assert_eq!(open_marked(&key, SEALED_PREFIX, b""), Err(OpenError));
        // Unmarked bytes were written before sealing: as they are.
        assert_eq!(open_marked(&key, b"{}", b"x").unwrap(), b"{}");
        // A damaged key file is refused, not replaced.
        std::fs::write(&path, "not a key").unwrap();
        assert!(SealKey::load_or_create(&path).is_err());
    }
}
