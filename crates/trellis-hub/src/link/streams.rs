//! Streams into an outpost (exec, port forwarding), opened by the hub on a
//! user's request and multiplexed on the outpost's link
//! ([`trellis_link::stream`] holds the flow control and the table).
//!
//! A caller (the API's exec and port-forward handlers, the console's
//! terminal) asks [`super::Links::open_stream`]: like a log request, that
//! hands a [`StreamRequest`] to the live session of the outpost, which
//! registers the stream in its table — made with the first stream, so an
//! idle link holds none — and sends `stream-open`. The caller then waits
//! for the agent's `stream-opened` or its refusal ([`PendingStream::opened`]).
//! Because the open goes through the same request path as logs, it follows
//! the session wherever that lives.
//!
//! [`StreamLimits`] bounds the streams open at once per outpost and per
//! user; a [`StreamPermit`] gives its slot back when dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use trellis_link::Message;
use trellis_link::protocol::{StreamError, StreamTarget};
use trellis_link::stream::{Inbound, Mux, StreamHandle, WINDOW_BYTES};

/// How long the agent may take to start a stream's command or connection.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// A caller's request for a live session.
#[derive(Debug)]
pub(crate) struct StreamRequest {
    pub id: u64,
    pub project: String,
    pub stage: String,
    pub target: StreamTarget,
    pub reply: oneshot::Sender<StreamHandle>,
}

/// The session's part: registers the stream and returns the frame to send.
pub(crate) fn open(mux: &mut Option<Box<Mux>>, request: StreamRequest) -> Option<Message> {
    let StreamRequest {
        id,
        project,
        stage,
        target,
        reply,
    } = request;
    if reply.is_closed() {
        // The caller gave up before the session got to it.
        return None;
    }
    let mux = mux.get_or_insert_with(Box::default);
    let handle = mux.register(id, WINDOW_BYTES, 0);
    if reply.send(handle).is_err() {
        // Dropping the handle queued its close; the entry goes with it.
        return None;
    }
    Some(Message::StreamOpen {
        id,
        project,
        stage,
        target,
        window: WINDOW_BYTES,
    })
}

/// A stream frame from the agent, for the session's table.
pub(crate) fn incoming(mux: &mut Option<Box<Mux>>, msg: Message) -> Option<Message> {
    let reply = mux.as_mut()?.incoming(msg);
    if mux.as_ref().is_some_and(|m| m.is_empty()) {
        // Frees the table with the last stream: an idle link holds none.
        // Frames still queued by ended streams' tasks go nowhere then,
        // which is right: their streams are gone.
        *mux = None;
    }
    reply
}

/// The next frame the session's streams want sent; frees the table when
/// the last stream has ended. Cancel-safe.
pub(crate) async fn outgoing(mux: &mut Option<Box<Mux>>) -> Message {
    let msg = trellis_link::stream::next_outgoing(mux).await;
    if mux.as_ref().is_some_and(|m| m.is_empty()) {
        *mux = None;
    }
    msg
}

/// Why no stream could be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenStreamError {
    /// The outpost has no live session.
    Offline,
    /// The agent does not serve streams (an older version).
    Unsupported,
    /// The session's queue is full.
    Busy,
    /// The agent refused it, with its reason.
    Refused(StreamError),
    /// The agent did not answer within [`OPEN_TIMEOUT`].
    Timeout,
    /// The link ended before the agent answered.
    LinkClosed,
}

/// A stream asked for, not yet accepted by the agent.
#[derive(Debug)]
pub struct PendingStream {
    pub(crate) reply: oneshot::Receiver<StreamHandle>,
}

impl PendingStream {
    /// Waits for the agent to accept the stream.
    pub async fn opened(self) -> Result<StreamHandle, OpenStreamError> {
        let wait = async {
            let mut handle = self.reply.await.map_err(|_| OpenStreamError::LinkClosed)?;
            match handle.reader.recv().await {
                Some(Inbound::Opened) => Ok(handle),
                Some(Inbound::Closed {
                    error: Some(error), ..
                }) => Err(OpenStreamError::Refused(error)),
                Some(_) | None => Err(OpenStreamError::LinkClosed),
            }
        };
        tokio::time::timeout(OPEN_TIMEOUT, wait)
            .await
            .unwrap_or(Err(OpenStreamError::Timeout))
    }
}

/// Limits on streams open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimitSettings {
    pub per_outpost: usize,
    pub per_user: usize,
}

impl Default for StreamLimitSettings {
    fn default() -> Self {
        StreamLimitSettings {
            // A port forward opens one stream per connection, and a
            // browser opens six at once; an outpost's link is shared by
            // every user of its stages.
            per_outpost: 64,
            per_user: 32,
        }
    }
}

/// Which limit a stream would break.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    Outpost { outpost: String, limit: usize },
    User { user: String, limit: usize },
}

/// Streams open per outpost and per user. Only outposts and users with open
/// streams have an entry.
#[derive(Debug, Default)]
pub struct StreamLimits {
    settings: StreamLimitSettings,
    open: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    outposts: HashMap<String, usize>,
    users: HashMap<String, usize>,
}

impl StreamLimits {
    pub fn new(settings: StreamLimitSettings) -> Self {
        StreamLimits {
            settings,
            open: Mutex::default(),
        }
    }

    /// Takes a slot for a stream of `user` into `outpost`.
    pub fn acquire(
        self: &Arc<Self>,
        user: &str,
        outpost: &str,
    ) -> Result<StreamPermit, LimitError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let of_outpost = open.outposts.get(outpost).copied().unwrap_or(0);
        if of_outpost >= self.settings.per_outpost {
            return Err(LimitError::Outpost {
                outpost: outpost.to_owned(),
                limit: self.settings.per_outpost,
            });
        }
        let of_user = open.users.get(user).copied().unwrap_or(0);
        if of_user >= self.settings.per_user {
            return Err(LimitError::User {
                user: user.to_owned(),
                limit: self.settings.per_user,
            });
        }
        *open.outposts.entry(outpost.to_owned()).or_default() += 1;
        *open.users.entry(user.to_owned()).or_default() += 1;
        Ok(StreamPermit {
            limits: self.clone(),
            user: user.to_owned(),
            outpost: outpost.to_owned(),
        })
    }

    fn release(&self, user: &str, outpost: &str) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let Counts { outposts, users } = &mut *open;
        for (map, key) in [(outposts, outpost), (users, user)] {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        }
    }
}

/// One open stream's slot; given back when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    user: String,
    outpost: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.limits.release(&self.user, &self.outpost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_outpost_and_user_and_permits_give_back() {
        let limits = Arc::new(StreamLimits::new(StreamLimitSettings {
            per_outpost: 2,
            per_user: 2,
        }));
        let a = limits.acquire("alice", "edge").unwrap();
        let _b = limits.acquire("bob", "edge").unwrap();
        assert_eq!(
            limits.acquire("carol", "edge").unwrap_err(),
            LimitError::Outpost {
                outpost: "edge".into(),
                limit: 2
            }
        );
        let _c = limits.acquire("alice", "other").unwrap();
        assert!(matches!(
            limits.acquire("alice", "third"),
            Err(LimitError::User { .. })
        ));
        drop(a);
        assert!(limits.acquire("carol", "edge").is_ok());
    }
}
