//! When a scheduled component runs next: its five-field cron expression
//! (or nickname) read in its `scheduled-timezone` (UTC when not given), so
//! `0 6 * * *` in `Europe/Berlin` means six in the morning there, across
//! daylight-saving changes.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};

/// The first instant strictly after `after` that `expr` names in `timezone`.
/// The manifest was checked on the hub, but the desired state comes from
/// the network, so a bad expression or zone is an error, not a panic.
pub fn next_run(
    expr: &str,
    timezone: Option<&str>,
    after: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    let tz = match timezone {
        Some(name) => Tz::from_str(name)
            .map_err(|_| format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin)"))?,
        None => Tz::UTC,
    };
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?} is not a valid cron schedule ({e})"))?;
    let local = after.with_timezone(&tz);
    cron.find_next_occurrence(&local, false)
        .map(|next| next.with_timezone(&Utc))
        .map_err(|e| format!("{expr:?} never runs after {after} ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn every_minute_is_the_next_minute() {
        let next = next_run("* * * * *", None, at("2026-03-01T10:00:30Z")).unwrap();
        assert_eq!(next, at("2026-03-01T10:01:00Z"));
    }

    #[test]
    fn reads_the_expression_in_its_timezone() {
        // 06:00 in Berlin is 05:00 UTC in winter, 04:00 UTC in summer.
        let winter = next_run(
            "0 6 * * *",
            Some("Europe/Berlin"),
            at("2026-01-10T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(winter, at("2026-01-10T05:00:00Z"));
        let summer = next_run(
            "0 6 * * *",
            Some("Europe/Berlin"),
            at("2026-07-10T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(summer, at("2026-07-10T04:00:00Z"));
    }

    #[test]
    fn nicknames_work() {
        let next = next_run("@daily", None, at("2026-03-01T10:00:00Z")).unwrap();
        assert_eq!(next, at("2026-03-02T00:00:00Z"));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(next_run("nope", None, Utc::now()).is_err());
        assert!(next_run("* * * * *", Some("Mars/Olympus"), Utc::now()).is_err());
    }
}
