//! The local container engine's command line (Podman or Docker), as
//! `push build` uses it: build an image from a Dockerfile, check that an
//! image is there or pull it, read its id, and save it as an archive.
//!
//! Only the command line is used (no API service): it is what a developer
//! has on a build machine, and the two engines agree on these commands.
//! The output of `build` and `pull` is streamed to the user's stderr as it
//! comes, and its last lines are kept for the error when the command fails.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};

use crate::cli::EngineKind;

/// How many of a failed command's last output lines its error repeats.
pub const TAIL_LINES: usize = 20;

/// The engine found on this machine.
#[derive(Debug, Clone)]
pub struct Engine {
    kind: EngineKind,
    program: PathBuf,
}

/// A command of the engine that ran and failed.
#[derive(Debug)]
pub struct Failed {
    /// `exit status 125`, or how it ended.
    pub status: String,
    /// Its last output lines (stdout and stderr, interleaved as read).
    pub tail: Vec<String>,
}

impl Failed {
    /// The tail, indented, for an error message.
    pub fn quoted(&self) -> String {
        if self.tail.is_empty() {
            return "  | (no output)".to_owned();
        }
        self.tail
            .iter()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Whether the output says the disk is full.
    pub fn disk_full(&self) -> bool {
        self.tail
            .iter()
            .any(|l| l.to_ascii_lowercase().contains("no space left on device"))
    }
}

fn kind_name(kind: EngineKind) -> &'static str {
    match kind {
        EngineKind::Podman => "podman",
        EngineKind::Docker => "docker",
    }
}

/// The executable `name` in a directory of `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

impl Engine {
    /// The engine `chosen` (`--engine`, `TRELLIS_ENGINE`), or else the
    /// first of podman and docker on `PATH`. `why` says what needs it, for
    /// the error when there is none.
    pub fn find(chosen: Option<EngineKind>, why: &str) -> anyhow::Result<Engine> {
        if let Some(kind) = chosen {
            let name = kind_name(kind);
            let program = on_path(name).with_context(|| {
                format!(
                    "the container engine {name} was chosen (--engine or TRELLIS_ENGINE) to build \
                     this project's images ({why}), but there is no `{name}` on PATH; install it, \
                     or choose the other engine with --engine {}",
                    kind_name(match kind {
                        EngineKind::Podman => EngineKind::Docker,
                        EngineKind::Docker => EngineKind::Podman,
                    })
                )
            })?;
            return Ok(Engine { kind, program });
        }
        for kind in [EngineKind::Podman, EngineKind::Docker] {
            if let Some(program) = on_path(kind_name(kind)) {
                return Ok(Engine { kind, program });
            }
        }
        bail!(
            "this project has container components ({why}), and building a build needs a \
             container engine on this machine to build, pull and save their images, but neither \
             `podman` nor `docker` is on PATH; install one (e.g. `apt-get install podman`), or \
             name one that is installed elsewhere with --engine podman|docker (TRELLIS_ENGINE) \
             after adding it to PATH"
        )
    }

    /// `podman` or `docker`.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind)
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut command = Command::new(&self.program);
        command
            .args(args.into_iter().map(Into::into))
            .stdin(Stdio::null());
        command
    }

    /// `<engine> build -f DOCKERFILE -t REFERENCE [--build-arg K=V …]
    /// [--platform P] [--no-cache] CONTEXT`, its output streamed to stderr
    /// when `echo`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &self,
        dockerfile: &Path,
        context: &Path,
        reference: &str,
        args: &BTreeMap<String, String>,
        platform: Option<&str>,
        no_cache: bool,
        echo: bool,
    ) -> anyhow::Result<Result<(), Failed>> {
        let mut argv: Vec<OsString> = vec!["build".into(), "-f".into(), dockerfile.into()];
        argv.extend(["-t".into(), reference.into()]);
        if no_cache {
            argv.push("--no-cache".into());
        }
        for (key, value) in args {
            argv.extend(["--build-arg".into(), format!("{key}={value}").into()]);
        }
        if let Some(platform) = platform {
            argv.extend(["--platform".into(), platform.into()]);
        }
        argv.push(context.into());
        self.streamed(argv, echo)
    }

    /// `<engine> pull REFERENCE`, its output streamed to stderr when `echo`.
    pub fn pull(
        &self,
        reference: &str,
        platform: Option<&str>,
        echo: bool,
    ) -> anyhow::Result<Result<(), Failed>> {
        let mut argv: Vec<OsString> = vec!["pull".into()];
        if let Some(platform) = platform {
            argv.extend(["--platform".into(), platform.into()]);
        }
        argv.push(reference.into());
        self.streamed(argv, echo)
    }

    /// The image's id (`sha256:<hex>`), or `Err` with what the engine said
    /// when it does not have the image (or cannot tell).
    pub fn image_id(&self, reference: &str) -> anyhow::Result<Result<String, Failed>> {
        let out = self
            .command(["image", "inspect", "--format", "{{.Id}}", reference])
            .output()
            .with_context(|| format!("running {} image inspect", self.program.display()))?;
        if !out.status.success() {
            return Ok(Err(Failed {
                status: out.status.to_string(),
                tail: last_lines(&out.stderr),
            }));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("").trim();
        normalize_image_id(first).map(Ok).with_context(|| {
            format!(
                "`{} image inspect {reference}` answered {first:?}, which is not an image id",
                self.name()
            )
        })
    }

    /// The architecture the engine's image is for (`amd64`, `arm64`, …), or
    /// `None` when it does not say.
    pub fn image_arch(&self, reference: &str) -> anyhow::Result<Option<String>> {
        let out = self
            .command([
                "image",
                "inspect",
                "--format",
                "{{.Architecture}}",
                reference,
            ])
            .output()
            .with_context(|| format!("running {} image inspect", self.program.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let arch = text.lines().next().unwrap_or("").trim();
        Ok((out.status.success() && !arch.is_empty()).then(|| arch.to_owned()))
    }

    /// Saves the image as a `docker save` archive into `file`.
    pub fn save(&self, reference: &str, file: &Path) -> anyhow::Result<Result<(), Failed>> {
        let mut argv: Vec<OsString> = vec!["save".into()];
        if self.kind == EngineKind::Podman {
            argv.extend(["--format".into(), "docker-archive".into()]);
        }
        argv.extend(["-o".into(), file.into(), reference.into()]);
        let out = self
            .command(argv)
            .output()
            .with_context(|| format!("running {} save", self.program.display()))?;
        if out.status.success() {
            return Ok(Ok(()));
        }
        let mut tail = last_lines(&out.stdout);
        tail.extend(last_lines(&out.stderr));
        Ok(Err(Failed {
            status: out.status.to_string(),
            tail,
        }))
    }

    /// Runs the engine with both output streams read line by line: echoed
    /// to stderr when `echo`, and the last [`TAIL_LINES`] kept.
    fn streamed(&self, argv: Vec<OsString>, echo: bool) -> anyhow::Result<Result<(), Failed>> {
        let verb = argv
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = self
            .command(argv)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {} {verb}", self.program.display()))?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let tail = Arc::clone(&tail);
            std::thread::spawn(move || relay(stream, &tail, echo))
        })
        .collect();
        for reader in readers {
            let _ = reader.join();
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for {} {verb}", self.name()))?;
        if status.success() {
            return Ok(Ok(()));
        }
        let tail = tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        Ok(Err(Failed {
            status: status.to_string(),
            tail,
        }))
    }
}

/// Copies `stream` to stderr (when `echo`) line by line, keeping the last
/// lines in `tail`.
fn relay(stream: Box<dyn Read + Send>, tail: &Mutex<VecDeque<String>>, echo: bool) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if echo {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&line);
            if !line.ends_with(b"\n") {
                let _ = err.write_all(b"\n");
            }
        }
        let text = clean_line(&line);
        if text.is_empty() {
            continue;
        }
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
}

/// A line of output as text: lossy UTF-8, without its line end, and only
/// what follows the last carriage return (progress redraws).
fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\n', '\r']);
    text.rsplit('\r').next().unwrap_or("").trim_end().to_owned()
}

fn last_lines(output: &[u8]) -> Vec<String> {
    let lines: Vec<String> = output
        .split(|&b| b == b'\n')
        .map(clean_line)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].to_vec()
}

/// `sha256:<64 hex>` from what an engine prints as an image id: Docker
/// prints the prefix, Podman only the hex.
pub fn normalize_image_id(id: &str) -> Option<String> {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_of_both_engines_normalize_to_sha256() {
        let hex = "ab".repeat(32);
        let want = format!("sha256:{hex}");
        assert_eq!(normalize_image_id(&hex), Some(want.clone()));
        assert_eq!(normalize_image_id(&want), Some(want.clone()));
        assert_eq!(
            normalize_image_id(&format!("sha256:{}", hex.to_uppercase())),
            Some(want)
        );
        assert_eq!(normalize_image_id("sha256:abc"), None);
        assert_eq!(normalize_image_id(""), None);
    }

    #[test]
    fn the_tail_keeps_the_last_lines_without_redraws() {
        let out: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = last_lines(out.as_bytes());
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 11");
        assert_eq!(clean_line(b"10%\r50%\r100%\r\n"), "100%");
    }
}
