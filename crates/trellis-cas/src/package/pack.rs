//! Packing a directory into a deterministic tar stream.
//!
//! Determinism is what makes packages content-addressed in practice: two
//! builds that produce the same files must produce the same digest, so
//! nothing is uploaded, stored or downloaded twice. Therefore the stream
//! records only names, content, the executable bit and symlink targets:
//! entries come in a fixed order (depth first, siblings sorted by name
//! bytes, each directory before its content), every time is 0, owners are
//! 0 with no names, and modes are normalised (see `rules.rs`).

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Take, Write};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::rules;
use crate::error::{CasError, Result};

/// What [`pack_dir`] put into the package.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PackSummary {
    /// Regular files packed.
    pub files: u64,
    /// Total size of the regular files' content, before compression.
    pub bytes: u64,
    /// Directories packed, not counting the packed directory itself.
    pub dirs: u64,
    /// Symlinks packed.
    pub symlinks: u64,
}

/// Packs the content of `dir` (not `dir` itself) into `out` as a
/// deterministic tar stream. The stream is not compressed: it is stored as
/// content-defined chunks that are compressed one by one, so that an edit
/// to one file changes only the chunks around it (a compressed stream would
/// differ from the edit to its end).
///
/// Fails, naming the offending path, on sockets, fifos and devices, on
/// symlinks whose target is absolute or could lead outside `dir`, and on
/// files that change while they are read. Symlinks inside `dir` are packed
/// as symlinks, never followed; `dir` itself may be a symlink. On failure
/// `out` holds an unusable partial stream and should be discarded (a
/// partial file is best removed).
pub fn pack_dir(dir: &Path, out: impl Write) -> Result<PackSummary> {
    let meta = fs::metadata(dir).map_err(|e| CasError::io("pack", dir, e))?;
    if !meta.is_dir() {
        return Err(CasError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let write_err = |source| CasError::PackWrite {
        dir: dir.to_path_buf(),
        source,
    };

    let mut builder = tar::Builder::new(out);
    let mut summary = PackSummary::default();

    // Depth-first with an explicit stack (a deep tree cannot overflow the
    // call stack). Children are pushed in reverse order so the smallest name
    // is popped first.
    let mut pending = sorted_children(dir, Path::new(""))?;
    while let Some(rel) = pending.pop() {
        let path = dir.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(|e| CasError::io("read", &path, e))?;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            let mut header = header(EntryType::Directory, rules::EXEC_MODE, 0);
            // The trailing slash is how tar tools mark directories by name.
            builder
                .append_data(&mut header, rel.join(""), io::empty())
                .map_err(write_err)?;
            summary.dirs += 1;
            pending.extend(sorted_children(dir, &rel)?);
        } else if file_type.is_file() {
            let size = append_file(&mut builder, dir, &rel, &path)?;
            summary.files += 1;
            summary.bytes += size;
        } else if file_type.is_symlink() {
            let target =
                fs::read_link(&path).map_err(|e| CasError::io("read symlink", &path, e))?;
            if let Err(reason) = rules::check_symlink_target(&rel, &target) {
                return Err(CasError::SymlinkEscapes {
                    dir: dir.to_path_buf(),
                    path,
                    target,
                    reason,
                });
            }
            let mut header = header(EntryType::Symlink, rules::SYMLINK_MODE, 0);
            builder
                .append_link(&mut header, &rel, &target)
                .map_err(write_err)?;
            summary.symlinks += 1;
        } else {
            return Err(CasError::UnsupportedFile {
                dir: dir.to_path_buf(),
                path,
                kind: special_kind(&meta),
            });
        }
    }

    let mut out = builder.into_inner().map_err(write_err)?;
    out.flush().map_err(write_err)?;
    Ok(summary)
}

/// The entries of directory `dir/rel`, as paths relative to `dir`, sorted
/// so that popping from the end yields them in ascending byte order.
fn sorted_children(dir: &Path, rel: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join(rel);
    let mut names = Vec::new();
    let entries = fs::read_dir(&path).map_err(|e| CasError::io("list directory", &path, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CasError::io("list directory", &path, e))?;
        names.push(entry.file_name());
    }
    // `OsString` orders by bytes on Unix, independent of locale and of the
    // order the filesystem happens to return.
    names.sort_unstable_by(|a, b| b.cmp(a));
    Ok(names.into_iter().map(|name| rel.join(name)).collect())
}

/// A header with every field that could vary between machines or runs set
/// to a constant. Path, link name and checksum are filled in by the builder.
fn header(entry_type: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// Appends the regular file `path` (named `rel` in the package) and returns
/// its size.
fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    path: &Path,
) -> Result<u64> {
    let changed = || CasError::ChangedWhilePacking {
        dir: dir.to_path_buf(),
        path: path.to_path_buf(),
    };
    let file = File::open(path).map_err(|e| CasError::io("open", path, e))?;
    // Size and mode come from the opened file, not from the earlier lstat,
    // so they describe exactly the bytes about to be read.
    let before = file.metadata().map_err(|e| CasError::io("read", path, e))?;
    if !before.is_file() {
        return Err(changed());
    }
    let size = before.len();
    let mut header = header(
        EntryType::Regular,
        rules::file_mode(mode_bits(&before)),
        size,
    );

    let mut reader = TrackedReader {
        inner: file.take(size),
        read: 0,
        failed: false,
    };
    if let Err(e) = builder.append_data(&mut header, rel, &mut reader) {
        return Err(if reader.failed {
            CasError::io("read", path, e)
        } else {
            CasError::PackWrite {
                dir: dir.to_path_buf(),
                source: e,
            }
        });
    }
    // The header already promised `size` bytes. A file that shrank left the
    // stream inconsistent, one that grew or was rewritten would be packed as
    // a mix of old and new; either way the package is refused.
    if reader.read != size {
        return Err(changed());
    }
    let mut file = reader.inner.into_inner();
    let mut probe = [0u8; 1];
    let grew = file
        .read(&mut probe)
        .map_err(|e| CasError::io("read", path, e))?
        > 0;
    let after = file.metadata().map_err(|e| CasError::io("read", path, e))?;
    if grew || after.len() != size || after.modified().ok() != before.modified().ok() {
        return Err(changed());
    }
    Ok(size)
}

/// Passes reads through, counting bytes and remembering whether a read
/// failed, so an error coming back out of the tar builder can be blamed on
/// the file being packed or on the output.
struct TrackedReader {
    inner: Take<File>,
    read: u64,
    failed: bool,
}

impl Read for TrackedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }
}

#[cfg(unix)]
fn mode_bits(meta: &Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode()
}

/// Without Unix modes there is no executable bit to keep.
#[cfg(not(unix))]
fn mode_bits(_meta: &Metadata) -> u32 {
    rules::FILE_MODE
}

#[cfg(unix)]
fn special_kind(meta: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "fifo (named pipe)"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
fn special_kind(_meta: &Metadata) -> &'static str {
    "special file"
}
