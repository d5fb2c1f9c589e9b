//! Small pure helpers that turn the hub's data into what pages show: times
//! relative to now, and the tone of a state badge (byte counts and instants
//! read as in the command line, from `trellis_model::display`).

use chrono::{DateTime, Utc};

/// How a state looks: `good` (green), `warn` (amber), `bad` (red) or `idle`
/// (grey). The words themselves are always shown too; colour only helps.
pub fn tone(state: &str) -> &'static str {
    match state {
        "online" | "in-sync" | "running" | "applied" | "succeeded" => "good",
        "degraded" | "syncing" | "pending-delivery" | "linking" | "awaiting-agent" | "starting"
        | "waiting" | "pending" | "suspended" | "applying" | "fetching" | "restarting" => "warn",
        "offline" | "failed" | "revoked" | "crash-looping" | "halted" => "bad",
        _ => "idle",
    }
}

/// A state badge: the state's words and their tone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Badge {
    pub text: String,
    pub tone: &'static str,
}

impl Badge {
    pub fn of(state: &str) -> Badge {
        Badge {
            text: state.to_owned(),
            tone: tone(state),
        }
    }
}

/// A stage's sync badge. While its outpost is not connected, a state the
/// agent confirmed earlier is shown as last known and not in green: it may
/// no longer hold.
pub fn sync_badge(sync: &str, connected: bool) -> Badge {
    if connected || !matches!(sync, "in-sync" | "suspended") {
        return Badge::of(sync);
    }
    Badge {
        text: format!("{sync} (last known)"),
        tone: "idle",
    }
}

/// `12 s ago`, `3 min ago`, `5 h ago`, `2 d ago`; `in 4 min` for the future.
pub fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (n, future) = if secs < 0 {
        (-secs, true)
    } else {
        (secs, false)
    };
    let amount = match n {
        0..60 => format!("{n} s"),
        60..3600 => format!("{} min", n / 60),
        3600..86400 => format!("{} h", n / 3600),
        _ => format!("{} d", n / 86400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

pub use trellis_model::display::{bytes, time as when};

/// An instant with how long ago it was: `2026-11-26 19:13:48 UTC (3 min ago)`.
pub fn when_ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    format!("{} ({})", when(t), ago(t, now))
}

/// When an outpost was last heard from, or `never`.
pub fn last_seen(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map_or_else(|| "never".to_owned(), |t| when_ago(t, now))
}

/// A link's round-trip time, or a dash before the first one is measured.
pub fn rtt(ms: Option<u64>) -> String {
    ms.map_or_else(|| "—".to_owned(), |ms| format!("{ms} ms"))
}

/// Whether `next` is a path on this hub that is safe to send a browser to
/// after signing in (no other host, no scheme).
pub fn is_local_path(next: &str) -> bool {
    next.starts_with('/') && !next.starts_with("//") && !next.contains('\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = at(100_000);
        assert_eq!(ago(at(100_000), now), "0 s ago");
        assert_eq!(ago(at(99_988), now), "12 s ago");
        assert_eq!(ago(at(100_000 - 180), now), "3 min ago");
        assert_eq!(ago(at(100_000 - 5 * 3600), now), "5 h ago");
        assert_eq!(ago(at(100_000 - 2 * 86400), now), "2 d ago");
        assert_eq!(ago(at(100_240), now), "in 4 min");
    }

    #[test]
    fn every_status_word_has_a_tone() {
        for good in ["online", "in-sync", "running", "applied"] {
            assert_eq!(tone(good), "good", "{good}");
        }
        for warn in [
            "syncing",
            "pending-delivery",
            "linking",
            "awaiting-agent",
            "degraded",
        ] {
            assert_eq!(tone(warn), "warn", "{warn}");
        }
        for bad in ["offline", "failed", "revoked", "crash-looping"] {
            assert_eq!(tone(bad), "bad", "{bad}");
        }
        assert_eq!(tone("superseded"), "idle");
        assert_eq!(tone("something new"), "idle");
    }

    #[test]
    fn confirmed_states_of_unreachable_outposts_are_not_green() {
        assert_eq!(sync_badge("in-sync", true), Badge::of("in-sync"));
        let stale = sync_badge("in-sync", false);
        assert_eq!(
            (stale.text.as_str(), stale.tone),
            ("in-sync (last known)", "idle")
        );
        assert_eq!(
            sync_badge("pending-delivery", false),
            Badge::of("pending-delivery")
        );
        assert_eq!(sync_badge("failed", false), Badge::of("failed"));
    }

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert!(is_local_path("/projects/shop"));
        assert!(!is_local_path("//evil.example/x"));
        assert!(!is_local_path("https://evil.example/"));
        assert!(!is_local_path("/\\evil.example"));
        assert!(!is_local_path(""));
    }
}
