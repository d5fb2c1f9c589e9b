//! Outposts' link profiles as the hub applies them (see
//! [`trellis_model::link_profile`]): the heartbeat each session keeps and
//! judges silence by, the pace at which an outpost's artifact bytes are
//! served ([`Pacer`]), and whether its delivery window is open.
//!
//! Every profile that differs from the defaults is held in memory
//! ([`Profiles`]), loaded at start and replaced when one is set (through
//! this hub's API, or another hub's: the store's feed says `p:<outpost>`),
//! so neither a chunk request nor the rollout driver asks the store.
//!
//! The time windows are judged by is a [`Clock`]: the system clock, or —
//! for tests that must see a window open without waiting hours — the
//! instant written in the file `TRELLIS_HUB_CLOCK_FILE` names.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use trellis_model::link_profile::{LinkProfile, Schedule, WindowState};
use trellis_store::{Store, StoreError};

/// The environment variable naming a file that holds the hub's "now" for
/// delivery windows (RFC 3339); for tests only.
pub const CLOCK_FILE_ENV: &str = "TRELLIS_HUB_CLOCK_FILE";

/// Where the hub takes the time its delivery windows are judged by.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
    /// How often sessions with windows look at the clock again: a minute
    /// on the system clock (windows are set in minutes), often with an
    /// injected clock that may jump.
    fn recheck(&self) -> Duration;
}

#[derive(Debug)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn recheck(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// The instant written in a file (RFC 3339); the system clock while the
/// file is missing or unreadable.
#[derive(Debug)]
pub struct FileClock(pub PathBuf);

impl Clock for FileClock {
    fn now(&self) -> DateTime<Utc> {
        std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc))
    }
    fn recheck(&self) -> Duration {
        Duration::from_millis(250)
    }
}

/// The clock the environment asks for (see [`CLOCK_FILE_ENV`]).
pub fn clock_from_env() -> Arc<dyn Clock> {
    match std::env::var_os(CLOCK_FILE_ENV) {
        Some(path) if !path.is_empty() => {
            tracing::warn!(file = ?path, "delivery windows follow the time in a file ({CLOCK_FILE_ENV}), not the system clock");
            Arc::new(FileClock(path.into()))
        }
        _ => Arc::new(SystemClock),
    }
}

/// One outpost's profile, ready to apply.
#[derive(Debug)]
pub struct Applied {
    pub profile: LinkProfile,
    pub schedule: Option<Schedule>,
    /// Paces the outpost's artifact bytes, when it has a cap.
    pub pacer: Option<Arc<Pacer>>,
}

/// Paces bytes to a rate shared by every request of one outpost: each
/// slice is booked on a virtual timeline and sent when its time has come,
/// so `n` bytes never take less than `n / rate` however many connections
/// share them, and idle time earns no burst.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next_free: Mutex<Option<Instant>>,
}

/// The largest slice paced at once: small enough that the parallel
/// fetches of one delivery interleave, large enough to keep the sleeps
/// (one per slice) few.
pub const PACE_SLICE: usize = 16 * 1024;

impl Pacer {
    pub fn new(rate: u64) -> Self {
        Pacer {
            rate: rate.max(1),
            next_free: Mutex::new(None),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Waits until `bytes` more may be sent.
    pub async fn take(&self, bytes: usize) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        let due = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = next.filter(|t| *t > now).unwrap_or(now);
            let due = start + cost;
            *next = Some(due);
            due
        };
        tokio::time::sleep_until(due).await;
    }
}

/// The profiles of every outpost that has one; see the module docs.
#[derive(Debug)]
pub struct Profiles {
    clock: Arc<dyn Clock>,
    map: RwLock<HashMap<String, Arc<Applied>>>,
}

impl Profiles {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Profiles {
            clock,
            map: RwLock::new(HashMap::new()),
        }
    }

    /// The time windows are judged by.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// Reads every outpost's profile (at start).
    pub async fn load(&self, store: &dyn Store) -> Result<(), StoreError> {
        let mut map = HashMap::new();
        for (outpost, profile) in store.list_link_profiles().await? {
            map.insert(outpost.clone(), Arc::new(applied(&outpost, profile)));
        }
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    /// Reads one outpost's profile again (another hub changed it).
    pub async fn reload(&self, store: &dyn Store, outpost: &str) {
        match store.get_link_profile(outpost).await {
            Ok(profile) => self.set(outpost, profile),
            Err(StoreError::NotFound { .. }) => self.set(outpost, LinkProfile::default()),
            Err(e) => {
                tracing::warn!(%outpost, error = %e, "could not read the outpost's new link profile; the old one stays until the next change")
            }
        }
    }

    /// The outpost's profile is now `profile`. A cap that did not change
    /// keeps its pacer, so deliveries under way keep their pace.
    pub fn set(&self, outpost: &str, profile: LinkProfile) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if profile.is_default() {
            map.remove(outpost);
            return;
        }
        let mut new = applied(outpost, profile);
        if let (Some(old), Some(rate)) = (map.get(outpost), new.profile.bandwidth_bytes_per_sec)
            && let Some(pacer) = old.pacer.as_ref().filter(|p| p.rate() == rate)
        {
            new.pacer = Some(pacer.clone());
        }
        map.insert(outpost.to_owned(), Arc::new(new));
    }

    pub fn get(&self, outpost: &str) -> Option<Arc<Applied>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(outpost)
            .cloned()
    }

    /// The outpost's heartbeat, or `default`.
    pub fn heartbeat(&self, outpost: &str, default: Duration) -> Duration {
        self.get(outpost)
            .and_then(|a| a.profile.heartbeat_secs)
            .map_or(default, |s| Duration::from_secs(u64::from(s)))
    }

    /// Whether the outpost's artifacts may move now.
    pub fn window(&self, outpost: &str) -> WindowState {
        match self.get(outpost).and_then(|a| a.schedule.clone()) {
            Some(schedule) => schedule.state_at(self.now()),
            None => WindowState::Open,
        }
    }

    /// The pacer of the outpost's artifact bytes, if it has a cap.
    pub fn pacer(&self, outpost: &str) -> Option<Arc<Pacer>> {
        self.get(outpost).and_then(|a| a.pacer.clone())
    }
}

fn applied(outpost: &str, profile: LinkProfile) -> Applied {
    // Checked when it was set; a profile that no longer parses (edited in
    // the store by hand) is ignored as a whole rather than half applied.
    let schedule = profile.schedule().unwrap_or_else(|e| {
        tracing::warn!(%outpost, error = %e, "the outpost's delivery windows do not parse; deliveries are not held back");
        None
    });
    let pacer = profile
        .bandwidth_bytes_per_sec
        .map(|rate| Arc::new(Pacer::new(rate)));
    Applied {
        profile,
        schedule,
        pacer,
    }
}

/// Slices `bytes` and sends each slice when `pacer` allows.
pub fn paced_body(bytes: bytes::Bytes, pacer: Arc<Pacer>) -> axum::body::Body {
    let stream = futures_util::stream::unfold((bytes, pacer), |(mut rest, pacer)| async move {
        if rest.is_empty() {
            return None;
        }
        let slice = rest.split_to(rest.len().min(PACE_SLICE));
        pacer.take(slice.len()).await;
        Some((Ok::<_, std::io::Error>(slice), (rest, pacer)))
    });
    axum::body::Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pacer_shares_its_rate_and_earns_no_burst() {
        let pacer = Arc::new(Pacer::new(1024 * 1024));
        // Idle time before the first byte is no credit.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let pacer = pacer.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..16 {
                    pacer.take(PACE_SLICE).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 4 × 16 × 16 KiB = 1 MiB at 1 MiB/s.
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(took < Duration::from_millis(1100), "{took:?}");
    }

    #[test]
    fn profiles_keep_a_pacer_whose_rate_did_not_change() {
        let profiles = Profiles::new(Arc::new(SystemClock));
        let capped = LinkProfile {
            bandwidth_bytes_per_sec: Some(4096),
            ..LinkProfile::default()
        };
        profiles.set("edge", capped.clone());
        let first = profiles.pacer("edge").unwrap();
        profiles.set(
            "edge",
            LinkProfile {
                heartbeat_secs: Some(300),
                ..capped
            },
        );
        assert!(Arc::ptr_eq(&first, &profiles.pacer("edge").unwrap()));
        assert_eq!(
            profiles.heartbeat("edge", Duration::from_secs(25)),
            Duration::from_secs(300)
        );
        profiles.set("edge", LinkProfile::default());
        assert!(profiles.pacer("edge").is_none());
        assert_eq!(
            profiles.heartbeat("edge", Duration::from_secs(25)),
            Duration::from_secs(25)
        );
    }
}
