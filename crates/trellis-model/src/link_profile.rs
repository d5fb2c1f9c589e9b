//! An outpost's link profile, for metered (cellular, satellite) networks:
//! how often its link heartbeats, how fast deliveries may move its
//! artifacts, and in which hours they may move at all.
//!
//! The administrator writes each part as text — `300s`, `1MiB/s`,
//! `mon-fri 22:00-06:00,sat,sun`, `Europe/Berlin` — and one parser per part
//! lives here, so the hub, the command line and the console agree. Every
//! error says what was wrong and, for windows, at which character.
//!
//! Delivery windows are hours in the outpost's time zone. A window is one
//! comma-separated item: days (`mon`, `mon-fri`, a range may wrap as in
//! `fri-mon`), hours (`22:00-06:00`; an end at or before the start crosses
//! midnight into the next day; `24:00` ends at midnight), or days followed
//! by hours. Days alone mean those whole days; hours alone mean every day.
//! Small desired-state frames flow whatever the windows say; only large
//! artifact bytes wait.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc, Weekday};
use serde::{Deserialize, Serialize};

/// The shortest heartbeat an administrator may set: shorter ones cost a
/// metered link more than they tell.
pub const MIN_HEARTBEAT_SECS: u32 = 5;
/// The longest heartbeat: the agent refuses longer ones from a hub (a link
/// believed up for hours after it died helps nobody).
pub const MAX_HEARTBEAT_SECS: u32 = 3600;
/// The lowest delivery bandwidth cap. Lower ones would take a typical
/// chunk (about 1 MiB) minutes, past every read timeout on the way.
pub const MIN_BANDWIDTH: u64 = 1024;

/// One outpost's link profile as stored; `None` parts follow the hub's
/// defaults (its `--heartbeat-secs`, no cap, always open, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LinkProfile {
    /// Seconds between heartbeats on the outpost's link; offline detection
    /// follows it (silence for two heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_secs: Option<u32>,
    /// Bytes per second the outpost's artifact deliveries may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// When large artifacts may move, in [`Windows`] syntax (canonical
    /// form); `None`: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<String>,
    /// The IANA time zone the windows are in; `None`: UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

impl LinkProfile {
    /// Whether nothing is set (the hub's defaults apply throughout).
    pub fn is_default(&self) -> bool {
        *self == LinkProfile::default()
    }

    /// The windows and time zone, parsed. A stored profile was checked when
    /// it was set, so an error here means the store was edited by hand.
    pub fn schedule(&self) -> Result<Option<Schedule>, LinkProfileError> {
        let Some(windows) = &self.windows else {
            return Ok(None);
        };
        let windows = Windows::from_str(windows)?;
        let zone = parse_timezone(self.timezone.as_deref().unwrap_or("UTC"))?;
        Ok(Some(Schedule { windows, zone }))
    }
}

/// What is wrong with a part of a link profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkProfileError {
    #[error("heartbeat {text:?}: {reason}")]
    Heartbeat { text: String, reason: String },
    #[error("bandwidth {text:?}: {reason}")]
    Bandwidth { text: String, reason: String },
    #[error("time zone {0}")]
    Timezone(String),
    #[error(transparent)]
    Window(#[from] WindowError),
}

impl LinkProfileError {
    /// A stable code for the API.
    pub fn code(&self) -> &'static str {
        match self {
            LinkProfileError::Heartbeat { .. } => "invalid-heartbeat",
            LinkProfileError::Bandwidth { .. } => "invalid-bandwidth",
            LinkProfileError::Timezone(_) => "invalid-timezone",
            LinkProfileError::Window(_) => "invalid-window",
        }
    }

    /// What to try instead.
    pub fn hint(&self) -> &'static str {
        match self {
            LinkProfileError::Heartbeat { .. } => {
                "give seconds from 5 to 3600, like 300s, 5m or 1h (or `default`)"
            }
            LinkProfileError::Bandwidth { .. } => {
                "give bytes per second like 1MiB/s, 512KiB/s or 2MB/s, at least 1KiB/s (or `none`)"
            }
            LinkProfileError::Timezone(_) => {
                "use an IANA name like Europe/Berlin, America/New_York or UTC"
            }
            LinkProfileError::Window(_) => {
                "write windows like `mon-fri 22:00-06:00,sat,sun` (days mon..sun, hours HH:MM-HH:MM; or `always`)"
            }
        }
    }
}

/// Parses a heartbeat: `300`, `300s`, `5m`, `1h`, `1m30s`; 5 s to 1 h.
pub fn parse_heartbeat(text: &str) -> Result<u32, LinkProfileError> {
    let err = |reason: String| LinkProfileError::Heartbeat {
        text: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(err("it is empty".into()));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut any_unit = false;
    for c in trimmed.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let scale = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            _ => {
                return Err(err(format!(
                    "{c:?} is not a unit; use s, m or h after a number"
                )));
            }
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| err(format!("a number must come before {c:?}")))?;
        total = total.saturating_add(n.saturating_mul(scale));
        digits.clear();
        any_unit = true;
    }
    if !digits.is_empty() {
        if any_unit {
            return Err(err(format!("{digits} has no unit after it")));
        }
        total = digits
            .parse()
            .map_err(|_| err("the number is too large".into()))?;
    }
    let secs = u32::try_from(total).unwrap_or(u32::MAX);
    if !(MIN_HEARTBEAT_SECS..=MAX_HEARTBEAT_SECS).contains(&secs) {
        return Err(err(format!(
            "{total} s is outside {MIN_HEARTBEAT_SECS} s to {MAX_HEARTBEAT_SECS} s"
        )));
    }
    Ok(secs)
}

/// Parses a bandwidth cap: `1MiB/s`, `512KiB/s`, `2MB/s`, `100000` (bytes
/// per second; the `/s` is optional), or `none` (no cap, `Ok(None)`).
pub fn parse_bandwidth(text: &str) -> Result<Option<u64>, LinkProfileError> {
    let err = |reason: String| LinkProfileError::Bandwidth {
        text: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    if trimmed.eq_ignore_ascii_case("none") || trimmed.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    let body = trimmed
        .strip_suffix("/s")
        .or_else(|| trimmed.strip_suffix("ps"))
        .unwrap_or(trimmed)
        .trim();
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    if number.is_empty() {
        return Err(err("it does not start with a number".into()));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| err(format!("{number:?} is not a number")))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "kB" | "KB" => 1e3,
        "KiB" | "Ki" => 1024.0,
        "M" | "MB" => 1e6,
        "MiB" | "Mi" => 1024.0 * 1024.0,
        "G" | "GB" => 1e9,
        "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(err(format!(
                "{other:?} is not a unit; use B, KB, KiB, MB, MiB, GB or GiB (per second)"
            )));
        }
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes > 1e15 {
        return Err(err("it is too large".into()));
    }
    // Whole bytes per second: the fraction of a byte is no cap anyone means.
    let bytes = bytes.round() as u64;
    if bytes < MIN_BANDWIDTH {
        return Err(err(format!(
            "{bytes} B/s is below the lowest cap, {MIN_BANDWIDTH} B/s (1KiB/s)"
        )));
    }
    Ok(Some(bytes))
}

/// A bandwidth as people read it: `1MiB/s`, `512KiB/s`, `1500B/s`.
pub fn format_bandwidth(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}MiB/s", bytes / MIB)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KiB/s", bytes / 1024)
    } else {
        format!("{bytes}B/s")
    }
}

/// Parses an IANA time zone name.
pub fn parse_timezone(text: &str) -> Result<chrono_tz::Tz, LinkProfileError> {
    crate::manifest::checks::check_timezone(text.trim()).map_err(LinkProfileError::Timezone)?;
    chrono_tz::Tz::from_str(text.trim())
        .map_err(|e| LinkProfileError::Timezone(format!("{text:?}: {e}")))
}

/// A window text that does not parse, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("window {text:?}, at character {position} ({found:?}): {reason}")]
pub struct WindowError {
    /// The whole text.
    pub text: String,
    /// 1-based character position of the offending part.
    pub position: usize,
    /// The offending part.
    pub found: String,
    pub reason: String,
}

/// Minutes since midnight.
type Minute = u32;

/// One window: on `days` (bit 0 = Monday), from `start` for `len` minutes
/// (up to a whole day; past midnight it runs into the next day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    days: u8,
    start: Minute,
    len: Minute,
}

const DAY: Minute = 24 * 60;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Delivery windows; see the module docs for the syntax. `always` (or an
/// empty list) means no restriction and parses to no windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    windows: Vec<Window>,
}

impl FromStr for Windows {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Windows, WindowError> {
        let mut windows = Vec::new();
        let mut offset = 0;
        for item in text.split(',') {
            let here = offset;
            offset += item.chars().count() + 1;
            let lead = item.chars().take_while(|c| c.is_whitespace()).count();
            let body = item.trim();
            let error = |at: usize, found: &str, reason: String| WindowError {
                text: text.to_owned(),
                position: here + lead + at + 1,
                found: found.to_owned(),
                reason,
            };
            if body.is_empty() {
                return Err(error(
                    0,
                    "",
                    if text.trim().is_empty() {
                        "no windows are given; write `always` for no restriction".into()
                    } else {
                        "an empty window (two commas, or one at an end)".into()
                    },
                ));
            }
            if body.eq_ignore_ascii_case("always") {
                if text.split(',').count() > 1 {
                    return Err(error(
                        0,
                        body,
                        "`always` cannot be combined with windows".into(),
                    ));
                }
                return Ok(Windows {
                    windows: Vec::new(),
                });
            }
            let mut parts = body.split_whitespace();
            let first = parts.next().unwrap_or_default();
            let second = parts.next();
            if let Some(extra) = parts.next() {
                let at = body.find(extra).unwrap_or(0);
                return Err(error(
                    at,
                    extra,
                    "a window is days, hours, or days then hours; this is a third part".into(),
                ));
            }
            let (days, hours) = match second {
                Some(hours) => {
                    let days = parse_days(first)
                        .map_err(|(at, found, reason)| error(at, found, reason))?;
                    (days, Some((hours, body.rfind(hours).unwrap_or(0))))
                }
                None if first.starts_with(|c: char| c.is_ascii_digit()) => (0x7f, Some((first, 0))),
                None => (
                    parse_days(first).map_err(|(at, found, reason)| error(at, found, reason))?,
                    None,
                ),
            };
            let (start, len) = match hours {
                None => (0, DAY),
                Some((hours, at)) => parse_hours(hours)
                    .map_err(|(off, found, reason)| error(at + off, found, reason))?,
            };
            windows.push(Window { days, start, len });
        }
        Ok(Windows { windows })
    }
}

/// `mon`, `mon-fri`, `fri-mon`: a bit set (bit 0 Monday). Errors carry the
/// offset within `text`.
fn parse_days(text: &str) -> Result<u8, (usize, &str, String)> {
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name))
            .or_else(|| match name.to_ascii_lowercase().as_str() {
                "monday" => Some(0),
                "tuesday" => Some(1),
                "wednesday" => Some(2),
                "thursday" => Some(3),
                "friday" => Some(4),
                "saturday" => Some(5),
                "sunday" => Some(6),
                _ => None,
            })
    };
    let unknown = |name: &str| {
        format!(
            "{name:?} is not a day; days are {} (ranges like mon-fri)",
            DAY_NAMES.join(", ")
        )
    };
    let (from, to) = match text.split_once('-') {
        Some((a, b)) => (a, Some(b)),
        None => (text, None),
    };
    let first = day(from).ok_or_else(|| (0, from, unknown(from)))?;
    let last = match to {
        None => first,
        Some(b) => day(b).ok_or_else(|| (from.len() + 1, b, unknown(b)))?,
    };
    let mut bits = 0u8;
    let mut d = first;
    loop {
        bits |= 1 << d;
        if d == last {
            break;
        }
        d = (d + 1) % 7;
    }
    Ok(bits)
}

/// `22:00-06:00` → (start, length in minutes). Errors carry the offset
/// within `text`.
fn parse_hours(text: &str) -> Result<(Minute, Minute), (usize, &str, String)> {
    let Some((a, b)) = text.split_once('-') else {
        return Err((
            0,
            text,
            "hours are a range HH:MM-HH:MM, like 22:00-06:00".into(),
        ));
    };
    let start = parse_clock(a).map_err(|reason| (0, a, reason))?;
    let end = parse_clock(b).map_err(|reason| (a.len() + 1, b, reason))?;
    if start == DAY {
        return Err((0, a, "a window cannot start at 24:00; write 00:00".into()));
    }
    let len = if end > start {
        end - start
    } else {
        // Crosses midnight (or, with equal ends, lasts the whole day).
        end + DAY - start
    };
    Ok((start, len))
}

fn parse_clock(text: &str) -> Result<Minute, String> {
    let form = "a time is HH:MM, 00:00 to 24:00";
    let (h, m) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not a time; {form}"))?;
    let two = |s: &str| s.len() == 2 && s.chars().all(|c| c.is_ascii_digit());
    if !(h.len() == 1 || two(h)) || !h.chars().all(|c| c.is_ascii_digit()) || !two(m) {
        return Err(format!("{text:?} is not a time; {form}"));
    }
    let h: u32 = h
        .parse()
        .map_err(|_| format!("{text:?} is not a time; {form}"))?;
    let m: u32 = m
        .parse()
        .map_err(|_| format!("{text:?} is not a time; {form}"))?;
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(format!("{text:?} is not a time of day; {form}"));
    }
    Ok(h * 60 + m)
}

impl fmt::Display for Windows {
    /// The canonical form, which parses back to the same windows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.windows.is_empty() {
            return f.write_str("always");
        }
        for (i, w) in self.windows.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let days = format_days(w.days);
            let hours = (w.start != 0 || w.len != DAY).then(|| {
                let end = (w.start + w.len) % DAY;
                let end = if end == 0 && w.start + w.len == DAY {
                    DAY
                } else {
                    end
                };
                format!(
                    "{:02}:{:02}-{:02}:{:02}",
                    w.start / 60,
                    w.start % 60,
                    end / 60,
                    end % 60
                )
            });
            match (days, hours) {
                (Some(days), Some(hours)) => write!(f, "{days} {hours}")?,
                (Some(days), None) => f.write_str(&days)?,
                (None, Some(hours)) => f.write_str(&hours)?,
                (None, None) => f.write_str("mon-sun")?,
            }
        }
        Ok(())
    }
}

/// Days as one range (`mon-fri`, `fri-mon`, `sat`), `None` for all seven.
/// A set that is not one range is written as its ranges in separate
/// windows by the caller; here it never happens: parsed days are a range.
fn format_days(bits: u8) -> Option<String> {
    if bits == 0x7f {
        return None;
    }
    // Find the start: a set day whose predecessor is not set.
    let start = (0..7).find(|&d| bits & (1 << d) != 0 && bits & (1 << ((d + 6) % 7)) == 0)?;
    let mut end = start;
    while bits & (1 << ((end + 1) % 7)) != 0 && (end + 1) % 7 != start {
        end = (end + 1) % 7;
    }
    Some(if start == end {
        DAY_NAMES[start].to_owned()
    } else {
        format!("{}-{}", DAY_NAMES[start], DAY_NAMES[end])
    })
}

impl Windows {
    /// Whether there is no restriction (`always`).
    pub fn is_always(&self) -> bool {
        self.windows.is_empty()
    }

    /// The intervals (local time) of windows starting on the days around
    /// `date`: from the day before (which may run into `date`) to a week
    /// after, in order of start.
    fn intervals_around(&self, date: NaiveDate) -> Vec<(NaiveDateTime, NaiveDateTime)> {
        let mut out = Vec::new();
        for offset in -1..=8 {
            let day = date + Duration::days(offset);
            let weekday = day.weekday().num_days_from_monday();
            for w in &self.windows {
                if w.days & (1 << weekday) == 0 {
                    continue;
                }
                let start = day.and_hms_opt(0, 0, 0).unwrap_or_default()
                    + Duration::minutes(i64::from(w.start));
                out.push((start, start + Duration::minutes(i64::from(w.len))));
            }
        }
        out.sort();
        out
    }

    /// Whether a local time falls in a window.
    pub fn is_open_at(&self, local: NaiveDateTime) -> bool {
        self.is_always()
            || self
                .intervals_around(local.date())
                .iter()
                .any(|(s, e)| *s <= local && local < *e)
    }

    /// When the next window opens after a local time at which none is
    /// open; `None` when one is open (or there are none at all).
    pub fn next_open_after(&self, local: NaiveDateTime) -> Option<NaiveDateTime> {
        if self.is_open_at(local) {
            return None;
        }
        self.intervals_around(local.date())
            .into_iter()
            .map(|(s, _)| s)
            .find(|s| *s > local)
    }
}

/// Windows in their time zone: the whole delivery-window question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub windows: Windows,
    pub zone: chrono_tz::Tz,
}

/// Whether artifacts may move now, and if not, when they may.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowState {
    Open,
    Closed {
        /// When the next window opens.
        opens_at: DateTime<Utc>,
        /// The same in words, in the outpost's zone: `22:00 Europe/Berlin`
        /// (with the weekday when it is not today: `sat 00:00 Europe/Berlin`).
        opens: String,
    },
}

impl Schedule {
    /// The state at `now`. Injected, so tests need not wait for a window.
    pub fn state_at(&self, now: DateTime<Utc>) -> WindowState {
        let local = now.with_timezone(&self.zone).naive_local();
        let Some(next) = self.windows.next_open_after(local) else {
            return WindowState::Open;
        };
        // A start inside a DST gap (the clock jumps over it) opens when the
        // clock lands after it.
        let opens_at = self
            .zone
            .from_local_datetime(&next)
            .earliest()
            .or_else(|| {
                self.zone
                    .from_local_datetime(&(next + Duration::hours(1)))
                    .earliest()
            })
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now + Duration::hours(1));
        let day = if next.date() == local.date() {
            String::new()
        } else {
            format!("{} ", short_weekday(next.weekday()))
        };
        WindowState::Closed {
            opens_at,
            opens: format!("{day}{} {}", next.format("%H:%M"), self.zone.name()),
        }
    }
}

fn short_weekday(day: Weekday) -> &'static str {
    DAY_NAMES[day.num_days_from_monday() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap()
    }

    #[test]
    fn heartbeats_take_units_and_bounds() {
        assert_eq!(parse_heartbeat("300").unwrap(), 300);
        assert_eq!(parse_heartbeat("300s").unwrap(), 300);
        assert_eq!(parse_heartbeat("5m").unwrap(), 300);
        assert_eq!(parse_heartbeat("1m30s").unwrap(), 90);
        assert_eq!(parse_heartbeat("1h").unwrap(), 3600);
        for bad in [
            "",
            "4s",
            "2h",
            "0",
            "5x",
            "m",
            "1m30",
            "99999999999999999999",
        ] {
            let e = parse_heartbeat(bad).unwrap_err();
            assert_eq!(e.code(), "invalid-heartbeat", "{bad}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(
            parse_heartbeat("2h")
                .unwrap_err()
                .to_string()
                .contains("outside 5 s to 3600 s")
        );
    }

    #[test]
    fn bandwidths_take_units() {
        assert_eq!(parse_bandwidth("1MiB/s").unwrap(), Some(1 << 20));
        assert_eq!(parse_bandwidth("512KiB/s").unwrap(), Some(512 * 1024));
        assert_eq!(parse_bandwidth("2MB/s").unwrap(), Some(2_000_000));
        assert_eq!(parse_bandwidth("1.5MiB/s").unwrap(), Some(3 << 19));
        assert_eq!(parse_bandwidth("100000").unwrap(), Some(100_000));
        assert_eq!(parse_bandwidth("none").unwrap(), None);
        for bad in ["", "fast", "1Mbit/s", "10B/s", "1e99GiB/s", "-1MiB/s"] {
            let e = parse_bandwidth(bad).unwrap_err();
            assert_eq!(e.code(), "invalid-bandwidth", "{bad}");
        }
        assert_eq!(format_bandwidth(1 << 20), "1MiB/s");
        assert_eq!(format_bandwidth(512 * 1024), "512KiB/s");
        assert_eq!(format_bandwidth(1500), "1500B/s");
    }

    #[test]
    fn time_zones_are_iana_names() {
        assert!(parse_timezone("Europe/Berlin").is_ok());
        let e = parse_timezone("Europe/Berlinn").unwrap_err();
        assert_eq!(e.code(), "invalid-timezone");
        assert!(e.to_string().contains("Europe/Berlin?"), "{e}");
    }

    #[test]
    fn windows_parse_and_print_canonically() {
        let w: Windows = "mon-fri 22:00-06:00, sat,sun".parse().unwrap();
        assert_eq!(w.to_string(), "mon-fri 22:00-06:00,sat,sun");
        let w: Windows = "01:00-05:30".parse().unwrap();
        assert_eq!(w.to_string(), "01:00-05:30");
        let w: Windows = "fri-mon 00:00-24:00".parse().unwrap();
        assert_eq!(w.to_string(), "fri-mon");
        assert!("always".parse::<Windows>().unwrap().is_always());
    }

    #[test]
    fn windows_cross_midnight_into_the_next_day() {
        let w: Windows = "mon-fri 22:00-06:00".parse().unwrap();
        // 2026-12-07 is a Monday.
        assert!(!w.is_open_at(at("2026-12-07 21:59")));
        assert!(w.is_open_at(at("2026-12-07 22:00")));
        assert!(w.is_open_at(at("2026-12-08 05:59"))); // Tuesday morning, Monday's window
        assert!(!w.is_open_at(at("2026-12-08 06:00")));
        assert!(w.is_open_at(at("2026-12-12 05:00"))); // Saturday morning, Friday's window
        assert!(!w.is_open_at(at("2026-12-12 07:00")));
        assert!(!w.is_open_at(at("2026-12-07 05:00"))); // Monday morning: Sunday has none
        assert_eq!(
            w.next_open_after(at("2026-12-12 07:00")),
            Some(at("2026-12-14 22:00"))
        );
        assert_eq!(w.next_open_after(at("2026-12-07 23:00")), None);
    }

    #[test]
    fn schedules_say_when_they_open_in_the_zone() {
        let s = LinkProfile {
            windows: Some("mon-fri 22:00-06:00,sat,sun".into()),
            timezone: Some("Europe/Berlin".into()),
            ..LinkProfile::default()
        }
        .schedule()
        .unwrap()
        .unwrap();
        // Monday 2026-12-07 12:00 UTC = 13:00 in Berlin (CET, +1).
        let noon = Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).unwrap();
        match s.state_at(noon) {
            WindowState::Closed { opens_at, opens } => {
                assert_eq!(
                    opens_at,
                    Utc.with_ymd_and_hms(2026, 12, 7, 21, 0, 0).unwrap()
                );
                assert_eq!(opens, "22:00 Europe/Berlin");
            }
            WindowState::Open => panic!("closed at 13:00 on a Monday"),
        }
        let late = Utc.with_ymd_and_hms(2026, 12, 7, 21, 30, 0).unwrap();
        assert_eq!(s.state_at(late), WindowState::Open);
        // Sunday is open all day; Monday 07:00 waits for Monday night.
        let sunday = Utc.with_ymd_and_hms(2026, 12, 13, 12, 0, 0).unwrap();
        assert_eq!(s.state_at(sunday), WindowState::Open);
        // Saturday 07:00 Berlin in a profile of weekday nights only opens on Monday.
        let nights = Schedule {
            windows: "mon-fri 22:00-06:00".parse().unwrap(),
            zone: chrono_tz::Europe::Berlin,
        };
        let saturday = Utc.with_ymd_and_hms(2026, 12, 12, 6, 0, 0).unwrap();
        match nights.state_at(saturday) {
            WindowState::Closed { opens, .. } => assert_eq!(opens, "mon 22:00 Europe/Berlin"),
            WindowState::Open => panic!("closed on Saturday morning"),
        }
        // Friday 06:30 Berlin: the next window is Friday night's.
        let friday = Utc.with_ymd_and_hms(2026, 12, 11, 5, 30, 0).unwrap();
        match s.state_at(friday) {
            WindowState::Closed { opens, .. } => assert_eq!(opens, "22:00 Europe/Berlin"),
            WindowState::Open => panic!("closed on Friday morning"),
        }
    }

    #[test]
    fn malformed_windows_name_the_position() {
        let cases = [
            ("mon-fry 22:00-06:00", 5, "fry", "not a day"),
            ("mon-fri 22:00-6", 15, "6", "not a time"),
            ("mon-fri 25:00-06:00", 9, "25:00", "not a time of day"),
            ("sat,,sun", 5, "", "empty window"),
            ("sat,sun,", 9, "", "empty window"),
            ("mon 10:00", 5, "10:00", "range"),
            ("mon 10:00-11:00 x", 17, "x", "third part"),
            ("", 1, "", "no windows"),
            ("sat, always", 6, "always", "cannot be combined"),
            ("10:60-11:00", 1, "10:60", "not a time"),
            ("24:00-01:00", 1, "24:00", "cannot start at 24:00"),
        ];
        for (text, position, found, reason) in cases {
            let e = text.parse::<Windows>().unwrap_err();
            assert_eq!(
                (e.position, e.found.as_str()),
                (position, found),
                "{text}: {e}"
            );
            assert!(e.reason.contains(reason), "{text}: {e}");
            assert!(
                e.to_string().contains(&format!("at character {position}")),
                "{e}"
            );
        }
    }

    fn window_text() -> impl Strategy<Value = String> {
        let day = 0usize..7;
        let days = prop_oneof![
            Just(None),
            day.clone().prop_map(|d| Some(DAY_NAMES[d].to_owned())),
            (day.clone(), day)
                .prop_map(|(a, b)| Some(format!("{}-{}", DAY_NAMES[a], DAY_NAMES[b]))),
        ];
        let hours = prop_oneof![
            Just(None),
            (0u32..24, 0u32..60, 0u32..25, 0u32..60).prop_map(|(h1, m1, h2, m2)| {
                let m2 = if h2 == 24 { 0 } else { m2 };
                Some(format!("{h1:02}:{m1:02}-{h2:02}:{m2:02}"))
            }),
        ];
        (days, hours).prop_map(|(d, h)| match (d, h) {
            (Some(d), Some(h)) => format!("{d} {h}"),
            (Some(d), None) => d,
            (None, Some(h)) => h,
            (None, None) => "sat".to_owned(),
        })
    }

    proptest! {
        #[test]
        fn parsing_never_panics_and_errors_point_inside(text in "[a-z0-9:, -]{0,40}") {
            if let Err(e) = text.parse::<Windows>() {
                prop_assert!(e.position >= 1 && e.position <= text.chars().count() + 1, "{e}");
            }
        }

        #[test]
        fn canonical_form_round_trips(items in proptest::collection::vec(window_text(), 1..4), minute in 0i64..(14 * 24 * 60)) {
            let text = items.join(",");
            let w: Windows = text.parse().unwrap();
            let again: Windows = w.to_string().parse().unwrap();
            let t = at("2026-12-07 00:00") + Duration::minutes(minute);
            prop_assert_eq!(w.is_open_at(t), again.is_open_at(t));
        }

        #[test]
        fn the_next_opening_is_open_and_nothing_before_it_is(items in proptest::collection::vec(window_text(), 1..4), minute in 0i64..(7 * 24 * 60)) {
            let w: Windows = items.join(",").parse().unwrap();
            let t = at("2026-12-07 00:00") + Duration::minutes(minute);
            match w.next_open_after(t) {
                None => prop_assert!(w.is_open_at(t)),
                Some(next) => {
                    prop_assert!(!w.is_open_at(t));
                    prop_assert!(w.is_open_at(next));
                    prop_assert!(next > t && next - t <= Duration::days(7));
                    let before = next - Duration::minutes(1);
                    prop_assert!(before <= t || !w.is_open_at(before));
                }
            }
        }
    }
}
