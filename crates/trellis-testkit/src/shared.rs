//! What the Podman and the Docker halves of the kit have in common: the
//! kit's directory, its lock files, the API ping, the busybox test image's
//! root file system, and the CLI helpers both engines answer the same way.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::fs::{FlockOperation, flock};

use crate::engines::{BUSYBOX_IMAGE, Object};

/// Where the sockets, the configs, the lock files and the logs live unless
/// `TRELLIS_TEST_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "/run/trellis-test";

/// The kit's directory, created if needed.
pub fn kit_dir() -> PathBuf {
    let dir = std::env::var_os("TRELLIS_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    if let Err(e) = fs::create_dir_all(&dir) {
        panic!(
            "trellis-testkit: cannot create {} ({e}); run the container tests as root or set \
             TRELLIS_TEST_DIR to a writable directory",
            dir.display()
        );
    }
    dir
}

/// What a test gets when its engine cannot run here (`what`): `None`, with
/// a note saying what to do (`remedy`) — or a panic when `CI` is set,
/// because container tests must not be skipped silently in CI.
pub fn unavailable<T>(what: &str, remedy: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!(
            "trellis-testkit: {what}, and container tests must not be skipped in CI (CI is \
             set); {remedy}"
        );
    }
    eprintln!("trellis-testkit: {what}; skipping this container test ({remedy} to run it)");
    None
}

/// The executable `name` in a directory of `PATH`, else in `also`.
pub fn find_program(name: &str, also: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(also.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether an API service answers `GET /_ping` on `socket`.
pub fn answers(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    response.starts_with("HTTP/1.1 200") && response.contains("OK")
}

/// The last lines of a log file, for a panic message.
pub fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A log file opened for appending, twice: for a child's stdout and stderr.
pub fn log_pair(path: &Path) -> (File, File) {
    let open = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("trellis-testkit: cannot open {}: {e}", path.display()))
    };
    (open(), open())
}

/// Writes `content` to `path` unless it holds it already (atomically, so a
/// concurrent reader never sees half of it), with `mode` permissions.
pub fn write_if_changed(path: &Path, content: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    if fs::read_to_string(path).is_ok_and(|now| now == content) {
        return;
    }
    // Unique per writer: threads of one test binary write concurrently too.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let tmp = path.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::write(&tmp, content)
        .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        panic!("trellis-testkit: cannot write {}: {e}", path.display());
    }
}

/// A `flock` on one of the kit's lock files, held until dropped.
pub struct Lock(File);

impl Lock {
    /// An exclusive lock (waits for it).
    pub fn take(path: &Path) -> Lock {
        Lock::with(path, FlockOperation::LockExclusive)
    }

    /// A shared lock (waits for it).
    pub fn share(path: &Path) -> Lock {
        Lock::with(path, FlockOperation::LockShared)
    }

    fn with(path: &Path, operation: FlockOperation) -> Lock {
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) => panic!("trellis-testkit: cannot open {}: {e}", path.display()),
        };
        if let Err(e) = flock(&file, operation) {
            panic!("trellis-testkit: cannot lock {}: {e}", path.display());
        }
        Lock(file)
    }

    /// The locked file.
    pub fn file(&self) -> &File {
        &self.0
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = flock(&self.0, FlockOperation::Unlock);
    }
}

/// `<engine> <object> inspect name` with `run`, or `None` when it does not
/// exist.
pub fn inspect(
    run: impl Fn(&[&str]) -> Output,
    object: Object,
    name: &str,
) -> Option<serde_json::Value> {
    let output = run(&[object.as_str(), "inspect", name]);
    if !output.status.success() {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    match value {
        serde_json::Value::Array(mut items) if !items.is_empty() => Some(items.remove(0)),
        _ => None,
    }
}

/// Names of the objects carrying `label` (`key=value` or `key`), listed by
/// `run_ok` (both engines take the same list commands), sorted.
pub fn labelled(run_ok: impl Fn(&[&str]) -> String, object: Object, label: &str) -> Vec<String> {
    let filter = format!("label={label}");
    let out = match object {
        Object::Container => run_ok(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]),
        Object::Network => run_ok(&[
            "network",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Name}}",
        ]),
        Object::Volume => run_ok(&["volume", "ls", "--filter", &filter, "--format", "{{.Name}}"]),
        Object::Image => run_ok(&[
            "images",
            "--filter",
            &filter,
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ]),
    };
    let mut names: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// The standard output of a CLI run that must succeed; panics with its
/// standard error when it failed.
pub fn stdout_ok(program: &str, args: &[&str], output: Output) -> String {
    if !output.status.success() {
        panic!(
            "trellis-testkit: {program} {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `command` — the engine's `import - BUSYBOX_IMAGE` — with the test
/// image's root file system on its standard input.
pub fn import_busybox(program: &str, mut command: Command) {
    let rootfs = busybox_rootfs();
    let mut child = match command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("trellis-testkit: cannot run {program} import: {e}"),
    };
    if let Some(mut stdin) = child.stdin.take()
        && let Err(e) = stdin.write_all(&rootfs)
    {
        panic!("trellis-testkit: cannot feed {program} import: {e}");
    }
    let output = match child.wait_with_output() {
        Ok(output) => output,
        Err(e) => panic!("trellis-testkit: {program} import failed: {e}"),
    };
    if !output.status.success() {
        panic!(
            "trellis-testkit: {program} import of {BUSYBOX_IMAGE} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

/// The static busybox the test image is made of.
pub const BUSYBOX_BINARY: &str = "/bin/busybox";

/// Applets linked into the test image (`/bin/<applet>` → `busybox`).
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "cp", "date", "echo", "env", "false", "grep", "head", "hostname", "httpd",
    "id", "kill", "ls", "mkdir", "nc", "nslookup", "ping", "printf", "ps", "rm", "seq", "sleep",
    "tail", "test", "touch", "true", "wc", "wget",
];

/// A tar of the test image's root file system.
pub fn busybox_rootfs() -> Vec<u8> {
    let busybox = match fs::read(BUSYBOX_BINARY) {
        Ok(bytes) => bytes,
        Err(e) => panic!(
            "trellis-testkit: cannot read {BUSYBOX_BINARY} ({e}); install it with `apt-get \
             install -y busybox-static`"
        ),
    };
    if has_interpreter(&busybox) {
        panic!(
            "trellis-testkit: {BUSYBOX_BINARY} is dynamically linked and cannot run in an empty \
             image; install the static one with `apt-get install -y busybox-static`"
        );
    }
    let mut tar = tar::Builder::new(Vec::new());
    let mut append = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: &str| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        let result = if kind == tar::EntryType::Symlink {
            tar.append_link(&mut header, path, link)
        } else {
            tar.append_data(&mut header, path, data)
        };
        if let Err(e) = result {
            panic!("trellis-testkit: cannot build the test image's tar ({path}): {e}");
        }
    };
    for dir in ["bin", "etc", "root", "www", "data", "var", "var/run"] {
        append(dir, tar::EntryType::Directory, 0o755, &[], "");
    }
    append("tmp", tar::EntryType::Directory, 0o1777, &[], "");
    append(
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "",
    );
    append(
        "etc/group",
        tar::EntryType::Regular,
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
        "",
    );
    append("bin/busybox", tar::EntryType::Regular, 0o755, &busybox, "");
    for applet in APPLETS {
        append(
            &format!("bin/{applet}"),
            tar::EntryType::Symlink,
            0o777,
            &[],
            "busybox",
        );
    }
    match tar.into_inner() {
        Ok(bytes) => bytes,
        Err(e) => panic!("trellis-testkit: cannot finish the test image's tar: {e}"),
    }
}

/// Whether an ELF64 little-endian executable names a program interpreter
/// (is dynamically linked).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a) as usize
        })
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_elf_interpreters() {
        assert!(!has_interpreter(b"not an elf"));
        if let Ok(sh) = fs::read("/bin/sh") {
            assert!(has_interpreter(&sh), "/bin/sh is dynamically linked");
        }
    }

    #[test]
    fn the_rootfs_holds_busybox_and_its_applets() {
        if fs::metadata(BUSYBOX_BINARY).is_err() {
            return;
        }
        let tar = busybox_rootfs();
        let mut archive = tar::Archive::new(&tar[..]);
        let paths: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(paths.contains(&"bin/busybox".to_owned()));
        assert!(paths.contains(&"bin/httpd".to_owned()));
    }

    #[test]
    fn a_shared_lock_admits_other_sharers_but_not_an_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.lock");
        let first = Lock::share(&path);
        let _second = Lock::share(&path);
        let probe = File::open(&path).unwrap();
        assert!(flock(&probe, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(first);
        drop(_second);
        assert!(flock(&probe, FlockOperation::NonBlockingLockExclusive).is_ok());
    }
}
