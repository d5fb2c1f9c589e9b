//! Deliveries in progress, as the hub's status view shows them (`syncing`:
//! bytes fetched of total, and the step).
//!
//! The deployer writes the newest progress of each stage onto the
//! [`DeliveryBoard`]; the link session sends what changed as
//! [`Message::Delivery`] frames. Progress is not durable and not
//! acknowledged: only the newest value of each stage matters, a session
//! that starts sends the values standing, and the status report of the
//! apply supersedes them.
//!
//! The board also holds the outpost's delivery window as the hub last said
//! ([`Message::LinkProfile`]): the deployer fetches no artifact while it is
//! closed, and says what it waits for.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use trellis_link::protocol::Message;

use crate::state::StageKey;

/// How often one stage's progress is put on the board at most (the last
/// value of a step always is).
pub const UPDATE_INTERVAL: Duration = Duration::from_millis(250);

/// How far a stage's delivery has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub revision: u64,
    pub fetched: u64,
    pub total: u64,
    pub step: String,
}

#[derive(Default)]
struct Board {
    entries: HashMap<StageKey, (Delivery, Instant)>,
    dirty: BTreeSet<StageKey>,
}

/// Whether the outpost's delivery window is open, as the hub said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub open: bool,
    /// When closed: when it opens, in words (`22:00 Europe/Berlin`).
    pub opens: Option<String>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            open: true,
            opens: None,
        }
    }
}

impl Window {
    /// The delivery step shown while waiting for it.
    pub fn waiting_step(&self) -> String {
        match &self.opens {
            Some(opens) => format!("waiting for delivery window (opens {opens})"),
            None => "waiting for delivery window".into(),
        }
    }
}

/// See the module docs.
#[derive(Default)]
pub struct DeliveryBoard {
    board: Mutex<Board>,
    changed: Notify,
    window: tokio::sync::watch::Sender<Window>,
}

impl std::fmt::Debug for DeliveryBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryBoard").finish_non_exhaustive()
    }
}

impl DeliveryBoard {
    /// The hub says the delivery window is now `window`.
    pub fn set_window(&self, window: Window) {
        self.window.send_if_modified(|w| {
            let changed = *w != window;
            *w = window;
            changed
        });
    }

    /// The delivery window as the hub last said, to wait on.
    pub fn window(&self) -> tokio::sync::watch::Receiver<Window> {
        self.window.subscribe()
    }

    /// Puts `delivery` on the board, unless the stage's last value of the
    /// same step is younger than [`UPDATE_INTERVAL`] and `last` is false.
    pub fn update(&self, stage: &StageKey, delivery: Delivery, last: bool) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((old, at)) = board.entries.get(stage)
            && !last
            && old.step == delivery.step
            && old.revision == delivery.revision
            && at.elapsed() < UPDATE_INTERVAL
        {
            return;
        }
        board
            .entries
            .insert(stage.clone(), (delivery, Instant::now()));
        board.dirty.insert(stage.clone());
        drop(board);
        self.changed.notify_one();
    }

    /// The stage's delivery is over (its status report says how it went).
    pub fn finish(&self, stage: &StageKey) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        board.entries.remove(stage);
        board.dirty.remove(stage);
    }

    /// The standing value of a stage, if a delivery is in progress.
    pub fn get(&self, stage: &StageKey) -> Option<Delivery> {
        let board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        board.entries.get(stage).map(|(d, _)| d.clone())
    }

    /// Every standing value is to be sent again (a new session).
    pub fn resend_all(&self) {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<StageKey> = board.entries.keys().cloned().collect();
        board.dirty.extend(keys);
        let any = !board.dirty.is_empty();
        drop(board);
        if any {
            self.changed.notify_one();
        }
    }

    /// The frames for what changed since the last call.
    pub fn take_changes(&self) -> Vec<Message> {
        let mut board = self.board.lock().unwrap_or_else(|p| p.into_inner());
        let dirty = std::mem::take(&mut board.dirty);
        dirty
            .into_iter()
            .filter_map(|stage| {
                let (d, _) = board.entries.get(&stage)?;
                Some(Message::Delivery {
                    project: stage.project.clone(),
                    stage: stage.stage.clone(),
                    revision: d.revision,
                    fetched: d.fetched,
                    total: d.total,
                    step: d.step.clone(),
                })
            })
            .collect()
    }

    /// Completes when something was put on the board.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(fetched: u64) -> Delivery {
        Delivery {
            revision: 3,
            fetched,
            total: 100,
            step: "fetching".into(),
        }
    }

    #[test]
    fn coalesces_and_throttles_updates() {
        let board = DeliveryBoard::default();
        let stage = StageKey::new("shop", "line3");
        board.update(&stage, delivery(10), false);
        board.update(&stage, delivery(20), false);
        let frames = board.take_changes();
        assert_eq!(frames.len(), 1);
        assert!(matches!(frames[0], Message::Delivery { fetched: 10, .. }));
        board.update(&stage, delivery(100), true);
        assert!(matches!(
            board.take_changes()[..],
            [Message::Delivery { fetched: 100, .. }]
        ));
        assert!(board.take_changes().is_empty());
        board.resend_all();
        assert_eq!(board.take_changes().len(), 1);
        board.finish(&stage);
        board.resend_all();
        assert!(board.take_changes().is_empty());
        assert_eq!(board.get(&stage), None);
    }
}
