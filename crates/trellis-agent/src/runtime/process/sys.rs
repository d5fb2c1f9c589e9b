//! The operating system side: reading `/proc`, signalling process groups,
//! resolving users. Linux only (`/proc/<pid>/stat`).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::process::Child;

/// What `/proc/<pid>/stat` says of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: char,
    /// Start time in clock ticks after boot (field 22).
    pub start_ticks: u64,
}

/// Reads `/proc/<pid>/stat`; `None` if there is no such process.
pub(super) fn stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may itself contain
    // spaces and parentheses: the fields after it follow the *last* `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); field 22 is at index 19.
    let state = fields.first()?.chars().next()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

/// Whether the process `pid` that started at `start_ticks` still runs (a
/// zombie has exited; a different start time means the pid was reused).
pub(super) fn is_running(pid: i32, start_ticks: u64) -> bool {
    matches!(stat(pid), Some(s) if s.start_ticks == start_ticks && s.state != 'Z' && s.state != 'X')
}

fn pid(raw: i32) -> Option<Pid> {
    Pid::from_raw(raw)
}

/// Sends `signal` to every process in group `pgid`; a group that is gone
/// is not an error.
pub(super) fn signal_group(pgid: i32, signal: Signal) -> io::Result<()> {
    let Some(pgid) = pid(pgid) else {
        return Ok(());
    };
    match rustix::process::kill_process_group(pgid, signal) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::SRCH => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether any process is left in group `pgid`.
pub(super) fn group_exists(pgid: i32) -> bool {
    match pid(pgid) {
        Some(p) => !matches!(
            rustix::process::test_kill_process_group(p),
            Err(e) if e == rustix::io::Errno::SRCH
        ),
        None => false,
    }
}

/// The exit code as a shell shows it: the code, or 128 + the signal.
pub(super) fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// Stops the process group led by `pid`: SIGTERM to the group, SIGKILL to
/// whatever is left of it after `grace` (a zero grace: SIGKILL at once). `child` (when the process is ours)
/// is reaped on the way; its exit status is returned.
///
/// A group whose leader is an adopted process (not our child) is checked
/// against `start_ticks` first, so a reused pid is never signalled.
pub(super) async fn terminate(
    pid: i32,
    start_ticks: u64,
    mut child: Option<&mut Child>,
    grace: Duration,
) -> Option<ExitStatus> {
    if child.is_none()
        && stat(pid).is_none_or(|s| s.start_ticks != start_ticks)
        && !group_exists(pid)
    {
        return None;
    }
    // No grace (a kill): SIGKILL only, so a TERM handler never runs.
    if !grace.is_zero()
        && let Err(e) = signal_group(pid, Signal::TERM)
    {
        tracing::warn!(pid, error = %e, "cannot send SIGTERM to a process group");
    }
    let mut status = None;
    let deadline = Instant::now() + grace;
    let mut killed = false;
    let mut give_up = None;
    loop {
        if let Some(child) = child.as_deref_mut()
            && status.is_none()
            && let Ok(Some(s)) = child.try_wait()
        {
            status = Some(s);
        }
        if !group_alive(pid) {
            break;
        }
        let now = Instant::now();
        if !killed && now >= deadline {
            if let Err(e) = signal_group(pid, Signal::KILL) {
                tracing::warn!(pid, error = %e, "cannot send SIGKILL to a process group");
            }
            killed = true;
            give_up = Some(now + Duration::from_secs(5));
        }
        if give_up.is_some_and(|t| now >= t) {
            tracing::warn!(
                pid,
                "processes of a stopped component are still there 5 s after SIGKILL"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if let Some(child) = child
        && status.is_none()
    {
        status = child.try_wait().ok().flatten();
    }
    status
}

/// Whether a live (not zombie) process is left in group `pgid`. Exited
/// members stay zombies until their parent reaps them — for an adopted
/// leader or an orphaned child that parent is not us — and a group of
/// zombies is stopped.
fn group_alive(pgid: i32) -> bool {
    if !group_exists(pgid) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in entries.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = text.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
        // state is field 3 (index 0), pgrp field 5 (index 2).
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid)
            && !matches!(fields.first(), Some(&"Z") | Some(&"X"))
        {
            return true;
        }
    }
    false
}

/// Resolves a manifest `user` (`name`, `uid`, `name:group`, `uid:gid`) to a
/// uid and gid from `/etc/passwd` and `/etc/group`.
pub(super) fn resolve_user(spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 4 && (f[0] == user || f[2] == user))
            .then(|| (f[2].parse().ok(), f[3].parse().ok()))
    });
    let (uid, primary_gid) = match (user.parse::<u32>(), entry) {
        (_, Some((Some(uid), gid))) => (uid, gid),
        (Ok(uid), _) => (uid, None),
        (Err(_), _) => return Err(format!("user {user:?} does not exist on this host")),
    };
    let gid = match group {
        None => primary_gid.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => std::fs::read_to_string("/etc/group")
                .unwrap_or_default()
                .lines()
                .find_map(|line| {
                    let f: Vec<&str> = line.split(':').collect();
                    (f.len() >= 3 && f[0] == g)
                        .then(|| f[2].parse().ok())
                        .flatten()
                })
                .ok_or_else(|| format!("group {g:?} does not exist on this host"))?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000000 100 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_ticks, 987654);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn our_own_process_is_running() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(is_running(me, s.start_ticks));
        assert!(!is_running(me, s.start_ticks + 1));
        assert!(stat(-1).is_none());
    }

    #[test]
    fn resolves_root() {
        assert_eq!(resolve_user("root").unwrap(), (0, 0));
        assert_eq!(resolve_user("0:0").unwrap(), (0, 0));
        assert_eq!(resolve_user("4321").unwrap().0, 4321);
        assert!(resolve_user("no-such-user-here").is_err());
    }
}
