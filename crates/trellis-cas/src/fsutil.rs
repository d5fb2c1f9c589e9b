//! Small filesystem helpers shared by the chunk store and the unpacker:
//! making directory entries durable, copying while telling read failures
//! apart from write failures (so errors can name the right path), and
//! recognising a full disk.

use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

/// Buffer size for streaming copies and hashing.
pub(crate) const COPY_BUF: usize = 64 * 1024;

/// Makes the entries of directory `dir` (created, renamed or removed names)
/// durable. Without this, a rename that was reported as done can be lost on
/// power failure even though the file's data was synced.
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Directories cannot be opened as files on this platform; renames there are
/// made durable by the filesystem's own journal, which is the best available.
#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Which side of a copy failed.
#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies all of `from` into `to`, returning the number of bytes copied.
/// Unlike `io::copy`, says whether reading or writing failed.
pub(crate) fn copy(from: &mut impl Read, to: &mut impl Write) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
}

/// Whether an I/O error means the disk (or the disk quota) is full: what
/// the hub, the agent and the CLI each turn into "free space" advice.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122)) || e.kind() == io::ErrorKind::StorageFull
}
