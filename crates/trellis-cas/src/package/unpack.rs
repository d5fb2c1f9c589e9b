//! Unpacking a package into a directory, safely and all-or-nothing.
//!
//! The stream is treated as hostile even though Trellis made it: a damaged
//! or forged package must not be able to write outside the destination,
//! leave links pointing outside it, or leave something that looks like a
//! complete package when it is not. Entries are therefore checked against
//! the same rules `pack_dir` follows (see `rules.rs`), written into a fresh
//! staging directory next to the destination, synced, and only then renamed
//! to the destination name. On any error the staging directory is removed.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::rules;
use crate::error::{CasError, Result};
use crate::fsutil::{self, CopyError};

/// Unpacks the package read from `reader` into `dest`, which must not exist
/// yet (its parent is created if needed).
///
/// Either `dest` appears complete, with everything synced to disk, or it
/// does not appear at all. Refuses, with nothing written, packages holding
/// absolute paths, `..` components, entries beneath a symlink, duplicate
/// entries, symlinks that could point outside `dest`, hard links and special
/// files. Files get mode 0o755 if executable in the package and 0o644
/// otherwise; directories get 0o755; times are those of the unpacking.
///
/// If another process unpacks to the same `dest` at the same time, one of
/// them fails with [`CasError::DestinationExists`]; since both unpacked the
/// same content (if `dest` is named after the digest), the loser can use
/// the winner's copy.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<()> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(CasError::DestinationExists {
            dest: dest.to_path_buf(),
        });
    }
    let Some(name) = dest.file_name() else {
        return Err(CasError::io(
            "unpack into",
            dest,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the destination must end in a directory name",
            ),
        ));
    };
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(|e| CasError::io("create the directory", parent, e))?;

    // Same directory as `dest`, hence same filesystem: the final rename is
    // atomic. The leading dot and the suffix mark it as incomplete to anyone
    // listing the parent; dropping `staging` removes it on every error path.
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".unpacking-");
    let staging = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(parent)
        .map_err(|e| CasError::io("create a staging directory in", parent, e))?;

    let written = extract(reader, staging.path(), dest)?;
    written.sync(staging.path())?;

    // Checked again right before the rename: on Linux, renaming onto an
    // existing *empty* directory silently replaces it.
    if fs::symlink_metadata(dest).is_ok() {
        return Err(CasError::DestinationExists {
            dest: dest.to_path_buf(),
        });
    }
    if let Err(e) = fs::rename(staging.path(), dest) {
        return Err(
            if matches!(
                e.kind(),
                io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty
            ) {
                CasError::DestinationExists {
                    dest: dest.to_path_buf(),
                }
            } else {
                CasError::io("move the unpacked package into place at", dest, e)
            },
        );
    }
    // The rename succeeded, so there is nothing left to clean up.
    let _ = staging.keep();
    fsutil::sync_dir(parent).map_err(|e| CasError::io("sync the directory", parent, e))?;
    Ok(())
}

/// What `extract` created, so it can be synced before the rename.
#[derive(Default)]
struct Written {
    files: Vec<PathBuf>,
    dirs: BTreeSet<PathBuf>,
}

impl Written {
    /// Syncs every file, then every directory (including `root`), and gives
    /// `root` the normal directory mode (temporary directories start 0o700).
    fn sync(&self, root: &Path) -> Result<()> {
        set_mode(root, rules::EXEC_MODE)?;
        // Syncing after all writes, rather than after each, lets the kernel
        // write the data back in bulk; by the time we ask, most is on disk.
        for file in &self.files {
            File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(|e| CasError::io("sync", file, e))?;
        }
        for dir in self.dirs.iter().map(PathBuf::as_path).chain([root]) {
            fsutil::sync_dir(dir).map_err(|e| CasError::io("sync the directory", dir, e))?;
        }
        Ok(())
    }
}

/// The first bytes of a zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Writes the entries of the package into `root` (the empty staging
/// directory). `dest` is only used in error messages.
fn extract(reader: impl Read, root: &Path, dest: &Path) -> Result<Written> {
    let invalid = |source| CasError::InvalidPackage {
        dest: dest.to_path_buf(),
        source,
    };
    let refuse = |entry: &Path, reason: String| CasError::UnsafeEntry {
        dest: dest.to_path_buf(),
        entry: entry.to_string_lossy().into_owned(),
        reason,
    };

    // Packages made before chunking were zstd-compressed as a whole; they
    // still unpack.
    let mut reader = io::BufReader::new(reader);
    let compressed = reader.fill_buf().map_err(invalid)?.starts_with(&ZSTD_MAGIC);
    let stream: Box<dyn Read + '_> = if compressed {
        Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(invalid)?)
    } else {
        Box::new(reader)
    };
    let mut archive = tar::Archive::new(Tail::new(stream));
    let mut written = Written::default();
    // Every path written so far, and which of them are symlinks: nothing
    // may be written twice, or beneath a symlink (that would follow it).
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut symlinks: HashSet<PathBuf> = HashSet::new();

    for entry in archive.entries().map_err(invalid)? {
        let mut entry = entry.map_err(invalid)?;
        let raw = entry.path().map_err(invalid)?.into_owned();
        let rel = rules::entry_path(&raw).map_err(|reason| refuse(&raw, reason.to_owned()))?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            // `./` is how many tar tools name the root; it carries nothing.
            if kind == EntryType::Directory {
                continue;
            }
            return Err(refuse(&raw, "has an empty path".to_owned()));
        }
        if let Some(link) = rel.ancestors().skip(1).find(|a| symlinks.contains(*a)) {
            return Err(refuse(
                &raw,
                format!(
                    "lies beneath the symlink {:?}, and writing it would follow the link",
                    link
                ),
            ));
        }
        if !seen.insert(rel.clone()) {
            return Err(refuse(&raw, "appears twice".to_owned()));
        }

        let path = root.join(&rel);
        match kind {
            EntryType::Directory => {
                create_dirs(root, &rel, &mut written)?;
                set_mode(&path, rules::EXEC_MODE)?;
            }
            EntryType::Regular => {
                if let Some(parent) = rel.parent() {
                    create_dirs(root, parent, &mut written)?;
                }
                let mode = rules::file_mode(entry.header().mode().map_err(invalid)?);
                let mut file = create_file(&path, mode)?;
                match fsutil::copy(&mut entry, &mut file) {
                    Ok(_) => {}
                    Err(CopyError::Read(e)) => return Err(invalid(e)),
                    Err(CopyError::Write(e)) => return Err(CasError::io("write", &path, e)),
                }
                // Set explicitly: the mode given at creation is cut by the
                // umask, and the package's mode should not depend on it.
                set_mode(&path, mode)?;
                written.files.push(path);
            }
            EntryType::Symlink => {
                let target = match entry.link_name().map_err(invalid)? {
                    Some(target) => target.into_owned(),
                    None => return Err(refuse(&raw, "is a symlink without a target".to_owned())),
                };
                if let Err(reason) = rules::check_symlink_target(&rel, &target) {
                    return Err(refuse(
                        &raw,
                        format!("is a symlink to {target:?}, which {reason}"),
                    ));
                }
                if let Some(parent) = rel.parent() {
                    create_dirs(root, parent, &mut written)?;
                }
                make_symlink(&target, &path)?;
                symlinks.insert(rel);
            }
            other => {
                return Err(refuse(
                    &raw,
                    format!(
                        "is a {}; packages may hold only files, directories and symlinks",
                        describe(other)
                    ),
                ));
            }
        }
    }
    // A tar stream ends with two zero blocks; one cut short ends early,
    // which the entries alone do not show.
    let mut tail = archive.into_inner();
    io::copy(&mut tail, &mut io::sink()).map_err(invalid)?;
    if !tail.is_complete_tar() {
        return Err(invalid(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the tar stream is cut short (it does not end with its end-of-archive blocks)",
        )));
    }
    Ok(written)
}

/// Counts what passes through and how many zero bytes end it.
struct Tail<R> {
    inner: R,
    total: u64,
    trailing_zeros: u64,
}

impl<R: Read> Tail<R> {
    fn new(inner: R) -> Self {
        Tail {
            inner,
            total: 0,
            trailing_zeros: 0,
        }
    }

    /// Whether the stream was whole blocks ending in two zero blocks.
    fn is_complete_tar(&self) -> bool {
        self.total.is_multiple_of(512) && self.trailing_zeros >= 1024
    }
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        match buf[..n].iter().rposition(|&b| b != 0) {
            Some(last) => self.trailing_zeros = (n - 1 - last) as u64,
            None => self.trailing_zeros += n as u64,
        }
        Ok(n)
    }
}

/// Creates `root/rel` and any missing parents, remembering each directory
/// so it gets synced. No component can be a symlink (refused earlier), so
/// this never leaves `root`.
fn create_dirs(root: &Path, rel: &Path, written: &mut Written) -> Result<()> {
    let mut path = root.to_path_buf();
    for name in rel.iter() {
        path.push(name);
        if written.dirs.contains(&path) {
            continue;
        }
        match fs::create_dir(&path) {
            Ok(()) => {}
            // Existing entries were all made by this unpacking; the entry
            // checks rule out symlinks, so this is a real directory unless a
            // file is in the way, which the next create reports.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {}
            Err(e) => return Err(CasError::io("create the directory", &path, e)),
        }
        written.dirs.insert(path.clone());
    }
    Ok(())
}

fn describe(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Link => "hard link",
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "fifo (named pipe)",
        EntryType::Continuous => "contiguous file",
        EntryType::GNUSparse => "sparse file",
        EntryType::XGlobalHeader => "pax global header",
        _ => "entry of an unknown type",
    }
}

#[cfg(unix)]
fn create_file(path: &Path, mode: u32) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // `create_new`: never open something that already exists (a symlink
    // planted under this name would otherwise be followed).
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CasError::io("create", path, e))
}

#[cfg(not(unix))]
fn create_file(path: &Path, _mode: u32) -> Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| CasError::io("create", path, e))
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| CasError::io("set permissions of", path, e))
}

/// No Unix modes here; the executable bit has no equivalent to restore.
#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

#[cfg(unix)]
fn make_symlink(target: &Path, path: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, path).map_err(|e| CasError::io("create symlink", path, e))
}

#[cfg(not(unix))]
fn make_symlink(_target: &Path, path: &Path) -> Result<()> {
    Err(CasError::io(
        "create symlink",
        path,
        io::Error::new(
            io::ErrorKind::Unsupported,
            "packages with symlinks can only be unpacked on Unix",
        ),
    ))
}
