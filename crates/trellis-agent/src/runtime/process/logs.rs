//! Component output: raw files the processes write to, and the
//! timestamped line log the agent makes of them.
//!
//! A process's stdout and stderr are files (`logs/<replica>.stdout`,
//! `.stderr`) opened `O_APPEND` by the agent and handed to the process as
//! its stdio — no pipe to the agent, so the process keeps running (and
//! keeps writing) when the agent dies. While the agent runs, a
//! [`Collector`] reads what is new every tick, stamps each line with the
//! time it saw it, and appends it as JSON to `logs/lines.jsonl`; how far it
//! read each raw file is in `logs/offsets.json`, so a restarted agent goes
//! on where the last one stopped (lines written while no agent ran get the
//! time they were collected).
//!
//! Rotation: a raw file the collector has read completely is truncated
//! once it is larger than the limit (the process writes with `O_APPEND`,
//! so it just continues at the new end); `lines.jsonl` is renamed to
//! `lines.1.jsonl` (one old file kept) once it is larger than the limit.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::Utc;

use super::layout::{read_json, write_json};
use crate::runtime::{LogLine, LogStream};

pub(super) const LINES: &str = "lines.jsonl";
pub(super) const LINES_OLD: &str = "lines.1.jsonl";
const OFFSETS: &str = "offsets.json";

/// A partial line longer than this is logged without waiting for its end.
const MAX_LINE: usize = 16 * 1024;
/// At most this much of one raw file is read per tick.
const MAX_READ: u64 = 4 << 20;

fn stream_name(stream: LogStream) -> &'static str {
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    }
}

pub(super) fn raw_path(logs: &Path, replica: u32, stream: LogStream) -> PathBuf {
    logs.join(format!("{replica}.{}", stream_name(stream)))
}

/// Opens a raw output file for a process to write to.
pub(super) fn open_raw(logs: &Path, replica: u32, stream: LogStream) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(raw_path(logs, replica, stream))
}

/// Turns raw output into timestamped lines; see the module docs.
#[derive(Debug)]
pub(super) struct Collector {
    dir: PathBuf,
    component: String,
    max_bytes: u64,
    /// Bytes consumed of each raw file, by file name.
    offsets: BTreeMap<String, u64>,
    dirty: bool,
    /// The last line collected (stderr preferred), for crash messages.
    last_line: Option<LogLine>,
}

impl Collector {
    pub fn open(dir: &Path, component: &str, max_bytes: u64) -> Collector {
        Collector {
            dir: dir.to_path_buf(),
            component: component.to_owned(),
            max_bytes: max_bytes.max(4096),
            offsets: read_json(&dir.join(OFFSETS)).unwrap_or_default(),
            dirty: false,
            last_line: None,
        }
    }

    /// The last non-empty line collected, stderr preferred over stdout.
    pub fn last_line(&self) -> Option<&str> {
        self.last_line.as_ref().map(|l| l.line.as_str())
    }

    /// Collects what is new. With `flush`, a last line without its line
    /// end is logged too (its process has exited).
    pub fn collect(&mut self, flush: bool) {
        if let Err(e) = self.try_collect(flush) {
            tracing::warn!(component = %self.component, dir = %self.dir.display(), error = %e,
                "cannot collect a component's output");
        }
    }

    fn try_collect(&mut self, flush: bool) -> io::Result<()> {
        let mut lines = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut raws = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((replica, stream)) = name.split_once('.') else {
                continue;
            };
            let Ok(replica) = replica.parse::<u32>() else {
                continue;
            };
            let stream = match stream {
                "stdout" => LogStream::Stdout,
                "stderr" => LogStream::Stderr,
                _ => continue,
            };
            raws.push((name, replica, stream));
        }
        raws.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, replica, stream) in raws {
            self.collect_file(&name, replica, stream, flush, &mut lines)?;
        }
        if !lines.is_empty() {
            self.append(&lines)?;
            let last = |stream| {
                lines
                    .iter()
                    .rev()
                    .find(|l| l.stream == stream && !l.line.trim().is_empty())
            };
            if let Some(line) = last(LogStream::Stderr).or_else(|| last(LogStream::Stdout)) {
                self.last_line = Some(line.clone());
            }
        }
        if self.dirty {
            write_json(&self.dir.join(OFFSETS), &self.offsets)?;
            self.dirty = false;
        }
        Ok(())
    }

    fn collect_file(
        &mut self,
        name: &str,
        replica: u32,
        stream: LogStream,
        flush: bool,
        out: &mut Vec<LogLine>,
    ) -> io::Result<()> {
        let path = self.dir.join(name);
        let mut file = File::open(&path)?;
        let len = file.metadata()?.len();
        let mut offset = self.offsets.get(name).copied().unwrap_or(0);
        if offset > len {
            // Truncated by someone else: start over.
            offset = 0;
            self.dirty = true;
        }
        if offset < len {
            let want = (len - offset).min(MAX_READ);
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(want as usize);
            (&mut file).take(want).read_to_end(&mut buf)?;
            let now = Utc::now();
            let mut consumed = 0;
            let mut rest = &buf[..];
            while let Some(end) = rest.iter().position(|&b| b == b'\n') {
                out.push(self.line(now, replica, stream, &rest[..end]));
                consumed += end + 1;
                rest = &rest[end + 1..];
            }
            if !rest.is_empty() && (flush || rest.len() >= MAX_LINE) {
                out.push(self.line(now, replica, stream, rest));
                consumed += rest.len();
            }
            if consumed > 0 {
                offset += consumed as u64;
                self.dirty = true;
            }
        }
        // Rotate the raw file once it is read completely and large.
        if offset == len && len > self.max_bytes {
            let f = OpenOptions::new().write(true).open(&path)?;
            // Only if nothing arrived meanwhile; otherwise next tick.
            if f.metadata()?.len() == len {
                f.set_len(0)?;
                offset = 0;
                self.dirty = true;
            }
        }
        self.offsets.insert(name.to_owned(), offset);
        Ok(())
    }

    fn line(
        &self,
        time: chrono::DateTime<Utc>,
        replica: u32,
        stream: LogStream,
        bytes: &[u8],
    ) -> LogLine {
        let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
        LogLine {
            time,
            component: self.component.clone(),
            replica,
            stream,
            line: String::from_utf8_lossy(bytes).into_owned(),
        }
    }

    fn append(&self, lines: &[LogLine]) -> io::Result<()> {
        let path = self.dir.join(LINES);
        if fs::metadata(&path).is_ok_and(|m| m.len() > self.max_bytes) {
            fs::rename(&path, self.dir.join(LINES_OLD))?;
        }
        let mut text = Vec::new();
        for line in lines {
            serde_json::to_writer(&mut text, line).map_err(io::Error::other)?;
            text.push(b'\n');
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        // One write: a reader sees whole lines or (at the end) a part it
        // leaves for later.
        file.write_all(&text)
    }
}

/// Parses the complete lines in `bytes`; returns them and how many bytes
/// they took.
fn parse_lines(bytes: &[u8]) -> (Vec<LogLine>, usize) {
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut rest = bytes;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        if let Ok(line) = serde_json::from_slice::<LogLine>(&rest[..end]) {
            out.push(line);
        }
        consumed += end + 1;
        rest = &rest[end + 1..];
    }
    (out, consumed)
}

/// Where a reader is in one component's line log.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Position {
    inode: u64,
    offset: u64,
}

fn read_from(path: &Path, offset: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let inode = file.metadata()?.ino();
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(Some((inode, buf)))
}

/// Every line of a component's log (the rotated file first), and where the
/// current file ends.
pub(super) fn read_all(dir: &Path) -> io::Result<(Vec<LogLine>, Position)> {
    let mut lines = Vec::new();
    if let Some((_, bytes)) = read_from(&dir.join(LINES_OLD), 0)? {
        lines.extend(parse_lines(&bytes).0);
    }
    let mut position = Position::default();
    if let Some((inode, bytes)) = read_from(&dir.join(LINES), 0)? {
        let (current, consumed) = parse_lines(&bytes);
        lines.extend(current);
        position = Position {
            inode,
            offset: consumed as u64,
        };
    }
    Ok((lines, position))
}

/// The lines added since `position`, following a rotation.
pub(super) fn read_new(dir: &Path, position: &mut Position) -> io::Result<Vec<LogLine>> {
    let mut lines = Vec::new();
    let current = dir.join(LINES);
    let inode = match fs::metadata(&current) {
        Ok(m) => m.ino(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(lines),
        Err(e) => return Err(e),
    };
    if position.inode != 0 && inode != position.inode {
        // Rotated: the rest of the file we were reading is now the old one.
        if let Some((old_inode, bytes)) = read_from(&dir.join(LINES_OLD), position.offset)?
            && old_inode == position.inode
        {
            lines.extend(parse_lines(&bytes).0);
        }
        *position = Position { inode, offset: 0 };
    }
    if let Some((inode, bytes)) = read_from(&current, position.offset)? {
        if position.inode == 0 {
            position.inode = inode;
        }
        let (new, consumed) = parse_lines(&bytes);
        lines.extend(new);
        position.offset += consumed as u64;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_lines_keeps_partial_ones_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path();
        let mut out = open_raw(logs, 0, LogStream::Stdout).unwrap();
        out.write_all(b"one\ntwo\r\nthr").unwrap();
        let mut c = Collector::open(logs, "web", 4096);
        c.collect(false);
        let (lines, mut pos) = read_all(logs).unwrap();
        let text: Vec<_> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(text, ["one", "two"]);
        assert_eq!(lines[0].component, "web");

        out.write_all(b"ee\n").unwrap();
        // A new collector (the agent restarted) goes on where the old one was.
        let mut c = Collector::open(logs, "web", 4096);
        c.collect(false);
        let new = read_new(logs, &mut pos).unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].line, "three");

        out.write_all(b"tail without end").unwrap();
        c.collect(true);
        assert_eq!(
            read_new(logs, &mut pos).unwrap()[0].line,
            "tail without end"
        );

        // Past the limit both files rotate; a follower sees every line.
        let big = "x".repeat(1000);
        let mut followed = 0;
        for _ in 0..12 {
            writeln!(out, "{big}").unwrap();
            c.collect(false);
            followed += read_new(logs, &mut pos).unwrap().len();
        }
        assert!(
            fs::metadata(raw_path(logs, 0, LogStream::Stdout))
                .unwrap()
                .len()
                <= 4096 + 1001
        );
        assert!(logs.join(LINES_OLD).exists());
        assert_eq!(followed, 12);
    }
}
