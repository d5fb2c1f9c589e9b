//! How a process component running as a user of its own reaches the device
//! nodes it holds: a POSIX ACL entry for that user on each node
//! (`user:<uid>:rw-`, as `setfacl -m` writes it), and only on those.
//!
//! The agent records the entries it added (`<root>/device-acl.json`) and
//! after every change makes the nodes carry exactly the entries the
//! components recorded on disk need: an entry a component no longer needs
//! (removed, stopped, given other devices, its stage deleted) is taken off
//! again. Entries the administrator set are never touched, unless one is
//! for the very user and node the agent manages.
//!
//! The ACL is the kernel's `system.posix_acl_access` extended attribute:
//! a version word (2) and entries of tag, permissions and id, little
//! endian. Writing one whose named entries are all gone makes the kernel
//! fold it back into the node's mode bits.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

const XATTR: &str = "system.posix_acl_access";
const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const NO_ID: u32 = u32::MAX;

/// Read, write (execute never matters for a device node).
pub const READ: u16 = 4;
pub const WRITE: u16 = 2;

/// The permission bits of an access string (`rw`, `r`, `rwm`).
pub fn perm_of(access: &str) -> u16 {
    let mut perm = 0;
    if access.contains('r') {
        perm |= READ;
    }
    if access.contains('w') {
        perm |= WRITE;
    }
    perm
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// The node's ACL; one made from its mode when it has none.
fn read(path: &Path) -> io::Result<Vec<Entry>> {
    let mut buf = [0u8; 8192];
    match rustix::fs::getxattr(path, XATTR, &mut buf[..]) {
        Ok(len) => decode(&buf[..len]),
        Err(rustix::io::Errno::NODATA) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            let bits = |shift: u32| u16::try_from((mode >> shift) & 7).unwrap_or(0);
            Ok(vec![
                Entry {
                    tag: USER_OBJ,
                    perm: bits(6),
                    id: NO_ID,
                },
                Entry {
                    tag: GROUP_OBJ,
                    perm: bits(3),
                    id: NO_ID,
                },
                Entry {
                    tag: OTHER,
                    perm: bits(0),
                    id: NO_ID,
                },
            ])
        }
        Err(e) => Err(e.into()),
    }
}

fn decode(bytes: &[u8]) -> io::Result<Vec<Entry>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a POSIX ACL of version 2");
    let (head, rest) = bytes.split_at_checked(4).ok_or_else(bad)?;
    if u32::from_le_bytes(head.try_into().map_err(|_| bad())?) != VERSION || rest.len() % 8 != 0 {
        return Err(bad());
    }
    Ok(rest
        .chunks_exact(8)
        .map(|c| Entry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// `entries` with a mask that lets every named entry through (as `setfacl`
/// recomputes it), in the order the kernel wants.
fn encode(mut entries: Vec<Entry>) -> Vec<u8> {
    entries.retain(|e| e.tag != MASK);
    let named = entries.iter().any(|e| matches!(e.tag, USER | GROUP));
    if named {
        let mask = entries
            .iter()
            .filter(|e| matches!(e.tag, USER | GROUP | GROUP_OBJ))
            .fold(0, |m, e| m | e.perm);
        entries.push(Entry {
            tag: MASK,
            perm: mask,
            id: NO_ID,
        });
    }
    entries.sort_by_key(|e| (e.tag, e.id));
    let mut out = VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

/// Sets (`Some`) or removes (`None`) the entry of user `uid` on `path`.
pub fn set_user(path: &Path, uid: u32, perm: Option<u16>) -> io::Result<()> {
    let mut entries = read(path)?;
    let before = entries.clone();
    entries.retain(|e| !(e.tag == USER && e.id == uid));
    if let Some(perm) = perm {
        entries.push(Entry {
            tag: USER,
            perm,
            id: uid,
        });
    }
    let changed = {
        let mut a = before.clone();
        let mut b = entries.clone();
        a.retain(|e| e.tag != MASK);
        b.retain(|e| e.tag != MASK);
        a.sort_by_key(|e| (e.tag, e.id));
        b.sort_by_key(|e| (e.tag, e.id));
        a != b
    };
    if !changed {
        return Ok(());
    }
    rustix::fs::setxattr(
        path,
        XATTR,
        &encode(entries),
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(io::Error::from)
}

/// The entries the agent wants on each node: path → uid → permissions.
pub type Wanted = BTreeMap<String, BTreeMap<u32, u16>>;

/// Makes the nodes carry `wanted`, taking off what the agent added before
/// (recorded in `record`) and no longer wants. A node that is not there
/// is skipped (and forgotten); failures are logged, never fatal: the
/// component then fails to open its device, which its logs say.
pub fn sync(record: &Path, wanted: &Wanted) {
    let had: Wanted = std::fs::read(record)
        .ok()
        .and_then(|b| serde_json::from_slice::<Recorded>(&b).ok())
        .map(|r| r.entries)
        .unwrap_or_default();
    if had.is_empty() && wanted.is_empty() {
        // No component holds a device, and the agent added no entry.
        return;
    }
    let mut kept = Wanted::new();
    let paths: std::collections::BTreeSet<&String> = had.keys().chain(wanted.keys()).collect();
    for path in paths {
        let node = Path::new(path);
        if !node.exists() {
            continue;
        }
        let want = wanted.get(path).cloned().unwrap_or_default();
        for uid in had.get(path).into_iter().flat_map(|m| m.keys()) {
            if !want.contains_key(uid)
                && let Err(e) = set_user(node, *uid, None)
            {
                tracing::warn!(node = %path, uid, error = %e,
                    "could not take a device's ACL entry off again");
                kept.entry(path.clone()).or_default().insert(*uid, 0);
            }
        }
        for (uid, perm) in &want {
            match set_user(node, *uid, Some(*perm)) {
                Ok(()) => {
                    kept.entry(path.clone()).or_default().insert(*uid, *perm);
                }
                Err(e) => tracing::warn!(node = %path, uid, error = %e,
                    "could not give a process component's user access to its device (POSIX ACL)"),
            }
        }
    }
    if kept == had {
        return;
    }
    let bytes = serde_json::to_vec_pretty(&Recorded { entries: kept }).unwrap_or_default();
    let dir = record.parent().unwrap_or(Path::new("."));
    let name = record
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Err(e) = crate::runner::write_atomically(dir, &name, &bytes) {
        tracing::warn!(file = %record.display(), error = %e,
            "could not record the device ACL entries the agent added");
    }
}

/// `<root>/device-acl.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Recorded {
    entries: Wanted,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_with_a_mask_recomputed() {
        let entries = vec![
            Entry {
                tag: OTHER,
                perm: 0,
                id: NO_ID,
            },
            Entry {
                tag: USER,
                perm: READ,
                id: 65534,
            },
            Entry {
                tag: USER_OBJ,
                perm: READ | WRITE,
                id: NO_ID,
            },
            Entry {
                tag: GROUP_OBJ,
                perm: 0,
                id: NO_ID,
            },
        ];
        let bytes = encode(entries);
        // As `setfacl -m u:65534:r` leaves a 0600 node.
        assert_eq!(
            hex(&bytes),
            "02000000010006\
             00ffffffff02000400feff000004000000ffffffff10000400ffffffff20000000ffffffff"
        );
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), 5);
        assert!(back.contains(&Entry {
            tag: MASK,
            perm: READ,
            id: NO_ID
        }));
        // Without named entries, no mask: the kernel folds it into the mode.
        let plain = encode(back.into_iter().filter(|e| e.tag != USER).collect());
        assert_eq!(decode(&plain).unwrap().len(), 3);
        assert!(decode(&[1, 0, 0, 0]).is_err());
        assert!(decode(&[2, 0, 0, 0, 1]).is_err());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn access_strings_become_permission_bits() {
        assert_eq!(perm_of("rw"), READ | WRITE);
        assert_eq!(perm_of("r"), READ);
        assert_eq!(perm_of("rwm"), READ | WRITE);
    }
}
