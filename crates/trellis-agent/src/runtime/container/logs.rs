//! Log lines of a stage's containers, one component or all of them merged.
//!
//! Without `follow`, every container's lines (its `tail`, from `since`) are
//! read, merged in time order and cut to the newest `tail`. With `follow`,
//! one reader per container streams into a merger; the backlog that
//! arrives in the first moments is sorted and cut like above, then lines
//! are passed on as they come. Every second the merger looks for new
//! containers (a release replaced them) and for restarted ones (a follow
//! ends when its container stops) and follows them too, skipping what it
//! already sent. It stops when the sink is closed.

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptions;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::engine::{Engine, Listed, engine_error};
use super::naming;
use crate::runtime::{LogLine, LogQuery, LogStream, RuntimeError};

/// A container whose lines are read.
#[derive(Debug, Clone)]
pub struct Source {
    pub id: String,
    pub component: String,
    pub replica: u32,
    pub running: bool,
}

impl Source {
    pub fn from_listed(listed: &Listed) -> Option<Source> {
        Some(Source {
            id: listed.id.clone(),
            component: listed.labels.get(naming::COMPONENT)?.clone(),
            replica: listed
                .labels
                .get(naming::REPLICA)
                .and_then(|r| r.parse().ok())
                .unwrap_or(0),
            running: listed.state == "running",
        })
    }
}

/// How long the backlog of a follow is gathered before it is sorted.
const BACKLOG_WINDOW: Duration = Duration::from_millis(250);
/// How often a follow looks for new and restarted containers.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// Sends the lines of `sources` matching `query` to `sink`. `discover`
/// lists the sources again (for `follow`).
pub async fn send_logs<D, F>(
    engine: &Engine,
    sources: Vec<Source>,
    query: &LogQuery,
    sink: mpsc::Sender<LogLine>,
    discover: D,
) -> Result<(), RuntimeError>
where
    D: Fn() -> F,
    F: std::future::Future<Output = Result<Vec<Source>, RuntimeError>>,
{
    if !query.follow {
        let reads = sources.iter().map(|s| read_all(engine, s, query));
        let mut lines = Vec::new();
        for result in futures_util::future::join_all(reads).await {
            lines.extend(result?);
        }
        for line in newest(lines, query.tail) {
            if sink.send(line).await.is_err() {
                break;
            }
        }
        return Ok(());
    }

    let started = Utc::now();
    let (tx, mut rx) = mpsc::channel::<(String, LogLine)>(1024);
    let mut followers: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut cursors: HashMap<String, Cursor> = HashMap::new();
    for source in &sources {
        let from = Start {
            since: query.since,
            tail: query.tail,
            skip: None,
        };
        followers.insert(
            source.id.clone(),
            follow(engine.clone(), source.clone(), from, tx.clone()),
        );
    }

    // The backlog: gathered briefly, then sorted and cut.
    let mut backlog = Vec::new();
    let window = tokio::time::sleep(BACKLOG_WINDOW);
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => break,
            _ = sink.closed() => {
                stop(followers);
                return Ok(());
            }
            Some((id, line)) = rx.recv() => backlog.push((id, line)),
        }
    }
    backlog.sort_by_key(|(_, line)| line.time);
    let skip = backlog
        .len()
        .saturating_sub(query.tail.unwrap_or(usize::MAX));
    for (i, (id, line)) in backlog.into_iter().enumerate() {
        cursors.entry(id).or_default().advance(line.time);
        if i < skip {
            continue;
        }
        if sink.send(line).await.is_err() {
            stop(followers);
            return Ok(());
        }
    }

    let mut discovery = tokio::time::interval(DISCOVERY_INTERVAL);
    discovery.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sink.closed() => break,
            Some((id, line)) = rx.recv() => {
                cursors.entry(id).or_default().advance(line.time);
                if sink.send(line).await.is_err() {
                    break;
                }
            }
            _ = discovery.tick() => {
                let Ok(now) = discover().await else { continue };
                followers.retain(|_, task| !task.is_finished());
                for source in now {
                    if followers.contains_key(&source.id) {
                        continue;
                    }
                    let from = match cursors.get(&source.id) {
                        // Seen before: it was restarted; go on from there.
                        Some(cursor) if source.running => Start {
                            since: Some(cursor.time),
                            tail: None,
                            skip: Some(cursor.clone()),
                        },
                        Some(_) => continue,
                        // New since the follow began.
                        None if !sources.iter().any(|s| s.id == source.id) => Start {
                            since: Some(started),
                            tail: None,
                            skip: None,
                        },
                        None if source.running => Start {
                            since: query.since.max(Some(started)),
                            tail: None,
                            skip: None,
                        },
                        None => continue,
                    };
                    followers.insert(
                        source.id.clone(),
                        follow(engine.clone(), source, from, tx.clone()),
                    );
                }
            }
        }
    }
    stop(followers);
    Ok(())
}

fn stop(followers: HashMap<String, JoinHandle<()>>) {
    for task in followers.into_values() {
        task.abort();
    }
}

/// The newest `tail` of `lines`, in time order (stable for equal times).
fn newest(mut lines: Vec<LogLine>, tail: Option<usize>) -> Vec<LogLine> {
    lines.sort_by_key(|l| l.time);
    if let Some(tail) = tail
        && lines.len() > tail
    {
        lines.drain(..lines.len() - tail);
    }
    lines
}

/// The newest time sent from a container, and how many lines of that
/// instant were sent (engines' `since` has whole seconds; Podman's
/// timestamps too).
#[derive(Debug, Clone)]
struct Cursor {
    time: DateTime<Utc>,
    at_time: usize,
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor {
            time: DateTime::<Utc>::MIN_UTC,
            at_time: 0,
        }
    }
}

impl Cursor {
    fn advance(&mut self, time: DateTime<Utc>) {
        if time > self.time {
            self.time = time;
            self.at_time = 1;
        } else if time == self.time {
            self.at_time += 1;
        }
    }
}

/// Where a reader starts.
struct Start {
    since: Option<DateTime<Utc>>,
    tail: Option<usize>,
    /// Lines already sent: older ones, and this many of its instant.
    skip: Option<Cursor>,
}

fn options(follow: bool, since: Option<DateTime<Utc>>, tail: Option<usize>) -> LogsOptions {
    LogsOptions {
        follow,
        stdout: true,
        stderr: true,
        since: since
            .map(|t| i32::try_from(t.timestamp()).unwrap_or(i32::MAX).max(0))
            .unwrap_or(0),
        until: 0,
        timestamps: true,
        tail: tail
            .map(|t| t.to_string())
            .unwrap_or_else(|| "all".to_owned()),
    }
}

/// Every line of one container (no follow).
async fn read_all(
    engine: &Engine,
    source: &Source,
    query: &LogQuery,
) -> Result<Vec<LogLine>, RuntimeError> {
    let mut stream = engine
        .docker
        .logs(&source.id, Some(options(false, query.since, query.tail)));
    let mut lines = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(output) => lines.extend(
                split(source, output)
                    .into_iter()
                    .filter(|l| query.since.is_none_or(|since| l.time >= since)),
            ),
            Err(e) => {
                return Err(engine_error(
                    "logs-failed",
                    &format!("reading the logs of component {:?}", source.component),
                    &e,
                ));
            }
        }
    }
    Ok(lines)
}

/// A reader following one container until it stops.
fn follow(
    engine: Engine,
    source: Source,
    start: Start,
    tx: mpsc::Sender<(String, LogLine)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stream = engine
            .docker
            .logs(&source.id, Some(options(true, start.since, start.tail)));
        let mut skip = start.skip;
        while let Some(Ok(output)) = stream.next().await {
            for line in split(&source, output) {
                if start.since.is_some_and(|since| line.time < since) && skip.is_none() {
                    continue;
                }
                if let Some(cursor) = &mut skip {
                    if line.time < cursor.time {
                        continue;
                    }
                    if line.time == cursor.time && cursor.at_time > 0 {
                        cursor.at_time -= 1;
                        continue;
                    }
                }
                if tx.send((source.id.clone(), line)).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// The lines of one frame (`<RFC 3339 time> <text>` each).
fn split(source: &Source, output: LogOutput) -> Vec<LogLine> {
    let (stream, bytes) = match output {
        LogOutput::StdErr { message } => (LogStream::Stderr, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => {
            (LogStream::Stdout, message)
        }
        LogOutput::StdIn { .. } => return Vec::new(),
    };
    let text = String::from_utf8_lossy(&bytes);
    text.split_terminator('\n')
        .map(|raw| {
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let (time, line) = match raw.split_once(' ') {
                Some((stamp, rest)) => match DateTime::parse_from_rfc3339(stamp) {
                    Ok(t) => (t.with_timezone(&Utc), rest),
                    Err(_) => (Utc::now(), raw),
                },
                None => match DateTime::parse_from_rfc3339(raw) {
                    Ok(t) => (t.with_timezone(&Utc), ""),
                    Err(_) => (Utc::now(), raw),
                },
            };
            LogLine {
                time,
                component: source.component.clone(),
                replica: source.replica,
                stream,
                line: line.to_owned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn source() -> Source {
        Source {
            id: "id".into(),
            component: "web".into(),
            replica: 1,
            running: true,
        }
    }

    #[test]
    fn splits_frames_into_timestamped_lines() {
        let lines = split(
            &source(),
            LogOutput::StdErr {
                message: Bytes::from_static(
                    b"2026-11-26T13:37:29Z one\n2026-11-26T13:37:30.5Z two words\r\n",
                ),
            },
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].line, "one");
        assert_eq!(lines[1].line, "two words");
        assert_eq!(lines[1].stream, LogStream::Stderr);
        assert_eq!(lines[1].replica, 1);
        assert_eq!(lines[1].time.timestamp_subsec_millis(), 500);
        let odd = split(
            &source(),
            LogOutput::StdOut {
                message: Bytes::from_static(b"no stamp \xff\n"),
            },
        );
        assert_eq!(odd[0].line, "no stamp \u{fffd}");
    }

    #[test]
    fn newest_keeps_the_tail_in_time_order() {
        let at = |s: i64, text: &str| LogLine {
            time: DateTime::from_timestamp(s, 0).unwrap(),
            component: "c".into(),
            replica: 0,
            stream: LogStream::Stdout,
            line: text.into(),
        };
        let lines = vec![at(3, "c"), at(1, "a"), at(2, "b"), at(3, "d")];
        let kept: Vec<String> = newest(lines, Some(3)).into_iter().map(|l| l.line).collect();
        assert_eq!(kept, ["b", "c", "d"]);
    }

    #[test]
    fn the_cursor_counts_lines_of_its_instant() {
        let mut c = Cursor::default();
        let t = DateTime::from_timestamp(5, 0).unwrap();
        c.advance(t);
        c.advance(t);
        assert_eq!(c.at_time, 2);
        c.advance(DateTime::from_timestamp(4, 0).unwrap());
        assert_eq!((c.time, c.at_time), (t, 2));
    }
}
