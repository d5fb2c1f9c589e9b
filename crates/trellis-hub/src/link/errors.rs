//! The bounded, de-duplicated error log of a link or stage: one entry per
//! (source, code), counting repeats, keeping first and last sighting. The
//! oldest entries go when it is full, so a noisy failure cannot grow it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// At most this many distinct errors are kept.
pub const MAX_ERRORS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorEntry {
    /// `hub` or `agent`.
    pub source: String,
    pub code: String,
    pub message: String,
    pub hint: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub count: u64,
}

#[derive(Debug, Default, Clone)]
pub struct ErrorLog {
    entries: Vec<ErrorEntry>,
}

impl ErrorLog {
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        source: &str,
        code: &str,
        message: &str,
        hint: &str,
        first_seen: DateTime<Utc>,
        last_seen: DateTime<Utc>,
        count: u64,
    ) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.source == source && e.code == code)
        {
            e.message = message.to_owned();
            e.hint = hint.to_owned();
            e.first_seen = e.first_seen.min(first_seen);
            e.last_seen = e.last_seen.max(last_seen);
            e.count = e.count.saturating_add(count);
            return;
        }
        if self.entries.len() >= MAX_ERRORS
            && let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(i, _)| i)
        {
            self.entries.remove(oldest);
        }
        self.entries.push(ErrorEntry {
            source: source.to_owned(),
            code: code.to_owned(),
            message: message.to_owned(),
            hint: hint.to_owned(),
            first_seen,
            last_seen,
            count,
        });
    }

    /// Newest first.
    pub fn entries(&self) -> Vec<ErrorEntry> {
        let mut v = self.entries.clone();
        v.sort_by_key(|e| std::cmp::Reverse(e.last_seen));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_counted_once_and_the_log_stays_bounded() {
        let mut log = ErrorLog::default();
        let t = |s| DateTime::from_timestamp(s, 0).unwrap();
        log.record("agent", "dns", "no such host", "", t(10), t(10), 1);
        log.record("agent", "dns", "no such host", "", t(5), t(20), 3);
        assert_eq!(log.entries().len(), 1);
        let e = &log.entries()[0];
        assert_eq!((e.count, e.first_seen, e.last_seen), (4, t(5), t(20)));
        for i in 0..100 {
            log.record("hub", &format!("c{i}"), "m", "", t(100 + i), t(100 + i), 1);
        }
        assert_eq!(log.entries().len(), MAX_ERRORS);
        assert_eq!(log.entries()[0].code, "c99", "newest first, oldest evicted");
    }
}
