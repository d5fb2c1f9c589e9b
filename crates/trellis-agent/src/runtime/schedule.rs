//! When a scheduled component runs next: its five-field cron expression
//! (or nickname) read in its `scheduled-timezone` (UTC when not given), so
//! `0 6 * * *` in `Europe/Berlin` means six in the morning there, across
//! daylight-saving changes.
//!
//! Zones come from the host's tz database (`/usr/share/zoneinfo`, or
//! `$TZDIR`), which the OS keeps current, and from the copy bundled into
//! the agent on a host without one (see `jiff` in Cargo.toml).

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use jiff::tz::{TimeZone, TimeZoneDatabase};

/// The first instant strictly after `after` that `expr` names in `timezone`.
/// The manifest was checked on the hub, but the desired state comes from
/// the network, so a bad expression or zone is an error, not a panic.
pub fn next_run(
    expr: &str,
    timezone: Option<&str>,
    after: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    let tz = match timezone {
        Some(name) => zone(name)
            .ok_or_else(|| format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin)"))?,
        None => TimeZone::UTC,
    };
    let cron = CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?} is not a valid cron schedule ({e})"))?;
    let out_of_range = |what: &dyn std::fmt::Display| {
        format!("{what} is out of the range of dates a schedule can name")
    };
    let local = jiff::Timestamp::new(after.timestamp(), after.timestamp_subsec_nanos() as i32)
        .map_err(|_| out_of_range(&after))?
        .to_zoned(tz);
    let next = cron
        .find_next_occurrence(&local, false)
        .map_err(|e| format!("{expr:?} never runs after {after} ({e})"))?
        .timestamp();
    DateTime::from_timestamp(next.as_second(), next.subsec_nanosecond() as u32)
        .ok_or_else(|| out_of_range(&next))
}

/// The zone `name` from the host's tz database, or from the bundled copy
/// when the host has none or an incomplete one (minimal images ship a few
/// zones).
fn zone(name: &str) -> Option<TimeZone> {
    jiff::tz::db().get(name).ok().or_else(|| bundled_zone(name))
}

fn bundled_zone(name: &str) -> Option<TimeZone> {
    static BUNDLED: std::sync::OnceLock<TimeZoneDatabase> = std::sync::OnceLock::new();
    BUNDLED
        .get_or_init(TimeZoneDatabase::bundled)
        .get(name)
        .ok()
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
    fn a_time_the_clock_skips_or_repeats_runs_once() {
        // Berlin skips 02:00–03:00 on 2026-03-29: a 02:30 job runs when the
        // clock jumps past it (03:00 CEST), as cron does, not a day late.
        let spring = next_run(
            "30 2 * * *",
            Some("Europe/Berlin"),
            at("2026-03-28T02:00:00Z"),
        )
        .unwrap();
        assert_eq!(spring, at("2026-03-29T01:00:00Z"));
        // 02:30 happens twice on 2026-10-25 (CEST, then CET): it runs at the
        // first, then next on the following day.
        let autumn = next_run(
            "30 2 * * *",
            Some("Europe/Berlin"),
            at("2026-10-24T23:00:00Z"),
        )
        .unwrap();
        assert_eq!(autumn, at("2026-10-25T00:30:00Z"));
        let after = next_run("30 2 * * *", Some("Europe/Berlin"), autumn).unwrap();
        assert_eq!(after, at("2026-10-26T01:30:00Z"));
    }

    #[test]
    fn zones_without_daylight_saving_and_with_odd_offsets() {
        let kolkata = next_run(
            "0 9 * * *",
            Some("Asia/Kolkata"),
            at("2026-01-10T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(kolkata, at("2026-01-10T03:30:00Z"));
    }

    #[test]
    fn the_bundled_zones_agree_with_the_hosts() {
        let instant = jiff::Timestamp::new(1_785_000_000, 0).unwrap();
        for name in ["Europe/Berlin", "America/New_York", "Asia/Kolkata", "UTC"] {
            let bundled = bundled_zone(name).expect("bundled");
            let host = jiff::tz::db().get(name).expect("the test host has tzdata");
            assert_eq!(
                bundled.to_offset(instant),
                host.to_offset(instant),
                "{name}"
            );
        }
        assert!(bundled_zone("Mars/Olympus").is_none());
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
