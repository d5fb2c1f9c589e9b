//! The exit codes of containers the engine restarted.
//!
//! A container the engine restarts (policy `unless-stopped`) is inspected
//! as running with `ExitCode` 0 once it runs again: Docker and Podman both
//! reset the code when they start it. Podman restarts at once, so an
//! observation rarely catches the exited state in between, and a
//! crash-looping component would be reported as having "exited with code
//! 0". The engine's event stream says each exit with its code (`die`, with
//! the `exitCode` attribute, on both engines); [`watch`] follows it and
//! keeps the last code of each container for the observer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::engine::Engine;

/// How long an exit is remembered; a restarted container is observed far
/// sooner than this.
const KEEP: Duration = Duration::from_secs(15 * 60);

/// At most this many containers' exits are remembered (a flood of exits
/// cannot grow the agent without bound).
const CAPACITY: usize = 4096;

/// How long the watcher waits before following the engine's events again
/// after the stream ended or failed (the engine restarted, say).
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// The last exit code of each container that exited lately; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ExitLog {
    exits: Arc<Mutex<HashMap<String, (i64, Instant)>>>,
}

impl ExitLog {
    /// The code container `id` last exited with, if it exited lately.
    pub fn code(&self, id: &str) -> Option<i64> {
        self.lock().get(id).map(|(code, _)| *code)
    }

    fn record(&self, id: &str, code: i64) {
        let now = Instant::now();
        let mut exits = self.lock();
        if exits.len() >= CAPACITY {
            exits.retain(|_, (_, at)| now.duration_since(*at) < KEEP);
        }
        if exits.len() >= CAPACITY
            && let Some(oldest) = exits
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(id, _)| id.clone())
        {
            exits.remove(&oldest);
        }
        exits.insert(id.to_owned(), (code, now));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, Instant)>> {
        self.exits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one line of the engine's event stream.
    pub(super) fn take(&self, line: &[u8]) {
        let Ok(event) = serde_json::from_slice::<Event>(line) else {
            return;
        };
        if event.kind != "container" || event.action != "die" {
            return;
        }
        let code = event
            .actor
            .attributes
            .get("exitCode")
            .and_then(|c| c.parse().ok());
        if let Some(code) = code
            && !event.actor.id.is_empty()
        {
            self.record(&event.actor.id, code);
        }
    }
}

/// The fields of an engine event the log reads; Docker and Podman agree
/// on these.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Event {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Action")]
    action: String,
    #[serde(rename = "Actor")]
    actor: Actor,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Actor {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Attributes")]
    attributes: HashMap<String, String>,
}

/// Follows the engine's events into `log` until the task is aborted,
/// following them again whenever the stream ends.
pub async fn watch(engine: Engine, log: ExitLog) {
    loop {
        if let Err(e) = engine.follow("/events", |line| log.take(line)).await {
            tracing::debug!(error = %e, "the engine's event stream ended; following it again");
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn die_events_of_both_engines_are_read() {
        let log = ExitLog::default();
        // Podman 4.3's compatibility API.
        log.take(br#"{"status":"die","id":"abc","Type":"container","Action":"die","Actor":{"ID":"abc","Attributes":{"containerExitCode":"3","exitCode":"3","image":"busybox","name":"w"}},"scope":"local","time":1,"timeNano":1}"#);
        // Docker 28.
        log.take(br#"{"status":"die","id":"def","from":"busybox","Type":"container","Action":"die","Actor":{"ID":"def","Attributes":{"exitCode":"137","io.trellis.outpost":"cell-4"}},"scope":"local","time":1,"timeNano":1}"#);
        assert_eq!(log.code("abc"), Some(3));
        assert_eq!(log.code("def"), Some(137));
    }

    #[test]
    fn other_events_and_damaged_lines_are_ignored() {
        let log = ExitLog::default();
        log.take(br#"{"Type":"container","Action":"start","Actor":{"ID":"abc","Attributes":{"containerExitCode":"0"}}}"#);
        log.take(br#"{"Type":"image","Action":"die","Actor":{"ID":"img","Attributes":{"exitCode":"1"}}}"#);
        log.take(br#"{"Type":"container","Action":"die","Actor":{"ID":"x","Attributes":{"exitCode":"not a number"}}}"#);
        log.take(b"{not json");
        assert_eq!(log.code("abc"), None);
        assert_eq!(log.code("img"), None);
        assert_eq!(log.code("x"), None);
    }

    #[test]
    fn the_log_stays_bounded() {
        let log = ExitLog::default();
        for n in 0..CAPACITY + 10 {
            log.record(&format!("c{n}"), 1);
        }
        assert_eq!(log.lock().len(), CAPACITY);
        assert_eq!(log.code(&format!("c{}", CAPACITY + 9)), Some(1));
        assert_eq!(log.code("c0"), None, "the oldest goes first");
    }
}
