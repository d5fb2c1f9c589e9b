//! What the hubs sharing one store see of each other.
//!
//! Several `trellis hub` processes ("instances") may run on one PostgreSQL
//! database. Each keeps its agents' links in memory, so the store tells
//! them what the others did:
//!
//! - a **change feed** ([`Change`]): the desired state of an outpost's
//!   stages changed, an outpost was revoked or deleted, an outpost's link
//!   was claimed by an instance. PostgreSQL sends these with `NOTIFY` from
//!   triggers, in the transaction that made the change, so a committed
//!   change is always announced; a listener that was cut off learns it
//!   missed some ([`Change::Missed`]) and re-checks everything.
//! - **instances**: each beats its record while it runs, so the others can
//!   tell a live instance from a dead one.
//! - **link claims**: which instance holds each outpost's link, at which
//!   epoch. A newer link-up claims a higher epoch, and the instance holding
//!   the older one ends it (fencing). The claims also say where a request
//!   that needs the live link must go.
//! - **job locks**: single-writer jobs (garbage collection) run on one
//!   instance at a time, under a PostgreSQL advisory lock that dies with
//!   the instance's connection.

use std::any::Any;

use tokio::sync::{mpsc, watch};
use trellis_model::Timestamp;

/// Something another hub (or this one) changed in a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A stage placed on the outpost changed its desired state, was placed
    /// there or removed: its session should sync.
    Outpost(String),
    /// The outpost was revoked or deleted: its link must close.
    Revoked(String),
    /// The outpost's link profile changed: its session applies it.
    Profile(String),
    /// `instance` claimed the outpost's link at `epoch`: any other session
    /// of it must end.
    Claimed {
        outpost: String,
        instance: String,
        epoch: u64,
    },
    /// The feed was interrupted and changes may have been lost: re-check
    /// everything.
    Missed,
}

impl Change {
    /// The `NOTIFY` payload of a change (see `migrations-postgres/`), or
    /// `None` if it is not one.
    pub fn parse(payload: &str) -> Option<Change> {
        let (kind, rest) = payload.split_once(':')?;
        match kind {
            "o" => Some(Change::Outpost(rest.to_owned())),
            "r" => Some(Change::Revoked(rest.to_owned())),
            "p" => Some(Change::Profile(rest.to_owned())),
            "c" => {
                let (epoch, rest) = rest.split_once(':')?;
                let (instance, outpost) = rest.split_once(':')?;
                Some(Change::Claimed {
                    outpost: outpost.to_owned(),
                    instance: instance.to_owned(),
                    epoch: epoch.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

/// One subscriber's changes, in commit order.
pub struct ChangeFeed(pub mpsc::Receiver<Change>);

impl ChangeFeed {
    /// The next change; `None` once the store is gone.
    pub async fn recv(&mut self) -> Option<Change> {
        self.0.recv().await
    }
}

/// A hub instance sharing the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Unique per process start.
    pub id: String,
    /// `host:port` at which the other instances reach it.
    pub address: String,
    pub version: String,
    pub started_at: Timestamp,
    /// Its last sign of life.
    pub beat_at: Timestamp,
}

/// Which instance holds (or last held) an outpost's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkClaim {
    pub outpost: String,
    pub instance: String,
    pub epoch: u64,
    pub since: Timestamp,
    /// When the holding session ended; `None` while it runs (or until its
    /// instance is found dead).
    pub released_at: Option<Timestamp>,
}

/// The lock of a single-writer job (see [`crate::Store::lock_job`]).
pub struct JobLock {
    held: watch::Receiver<bool>,
    /// Releases the lock when dropped (PostgreSQL: returns the connection
    /// that holds it, which unlocks first).
    _guard: Option<Box<dyn Any + Send + Sync>>,
}

impl JobLock {
    /// A lock nobody else can take: the store has one hub.
    pub fn local() -> JobLock {
        let (tx, held) = watch::channel(true);
        // Kept alive by the guard, so the lock never reads as lost.
        JobLock {
            held,
            _guard: Some(Box::new(tx)),
        }
    }

    /// A lock that is held while `held` says so, released when `guard` is
    /// dropped.
    pub fn new(held: watch::Receiver<bool>, guard: Box<dyn Any + Send + Sync>) -> JobLock {
        JobLock {
            held,
            _guard: Some(guard),
        }
    }

    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Resolves once the lock is lost (the connection holding it broke).
    pub async fn lost(&mut self) {
        loop {
            if !*self.held.borrow_and_update() {
                return;
            }
            if self.held.changed().await.is_err() {
                return;
            }
        }
    }
}

/// How long database calls waited for a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Calls that found no idle connection and had to wait.
    pub waits: u64,
    /// Time spent waiting for connections, in seconds.
    pub wait_seconds: f64,
    /// Connections open and idle now.
    pub size: u32,
    pub idle: u32,
    /// Connections closed because they did not answer the check when
    /// handed back (PostgreSQL's `RELEASE_CHECK`).
    pub discarded: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_notification_payloads() {
        assert_eq!(
            Change::parse("o:edge-1"),
            Some(Change::Outpost("edge-1".into()))
        );
        assert_eq!(
            Change::parse("r:edge-1"),
            Some(Change::Revoked("edge-1".into()))
        );
        assert_eq!(
            Change::parse("p:edge-1"),
            Some(Change::Profile("edge-1".into()))
        );
        assert_eq!(
            Change::parse("c:42:i-7f3a:edge-1"),
            Some(Change::Claimed {
                outpost: "edge-1".into(),
                instance: "i-7f3a".into(),
                epoch: 42
            })
        );
        assert_eq!(Change::parse("c:x:i:edge"), None);
        assert_eq!(Change::parse("garbage"), None);
    }

    #[tokio::test]
    async fn a_job_lock_reports_when_it_is_lost() {
        let (tx, rx) = watch::channel(true);
        let mut lock = JobLock::new(rx, Box::new(()));
        assert!(lock.is_held());
        tx.send(false).unwrap();
        lock.lost().await;
        assert!(!lock.is_held());
        let mut local = JobLock::local();
        assert!(local.is_held());
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), local.lost()).await;
        assert!(waited.is_err(), "a local lock is never lost");
    }
}
