//! The line-based control protocol of the `trellis-faultproxy` binary, kept
//! in the library so it can be unit-tested and reused by other drivers.
//!
//! One command per line; the binary answers each with `ok` (or, for
//! `stats`/`mode`, one line of data) or a line starting with `error:`.
//!
//! | line | effect |
//! | --- | --- |
//! | `pass` | [`Mode::Pass`] |
//! | `drop` (or `refuse`) | [`Mode::Refuse`]: new connections are dropped at once |
//! | `blackhole` | [`Mode::Blackhole`] |
//! | `delay MS` | [`Mode::Delay`] of `MS` milliseconds |
//! | `throttle BYTES_PER_SEC` | [`Mode::Throttle`] |
//! | `reset` | [`FaultProxy::drop_connections`](crate::FaultProxy::drop_connections): reset every current connection, mode unchanged |
//! | `stats` | prints `accepted=N active=N up=N down=N` |
//! | `mode` | prints the current mode in this protocol's spelling |
//!
//! `drop` is the mode that drops *new* connections and `reset` is the
//! one-shot that resets *existing* ones, matching what a peer sees (a dropped
//! connect attempt vs. a reset connection). Blank lines and lines starting
//! with `#` are ignored so scripts can carry comments.

use std::time::Duration;

use crate::Mode;

/// One parsed control line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Switch to this mode.
    Set(Mode),
    /// Close every current connection.
    Reset,
    /// Report [`Stats`](crate::Stats).
    Stats,
    /// Report the current mode.
    Mode,
}

/// Why a control line was rejected; its `Display` is what follows `error: `.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error(
        "unknown command {0:?} (try pass, drop, blackhole, delay MS, throttle BYTES_PER_SEC, reset, stats, mode)"
    )]
    Unknown(String),
    #[error("{command} takes {expected}")]
    BadArgs {
        command: &'static str,
        expected: &'static str,
    },
}

/// Parses one control line. `Ok(None)` for a blank or comment line.
pub fn parse_line(line: &str) -> Result<Option<Command>, ParseError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    // `line` is non-empty after trimming, so it has a first word; the
    // fallback only keeps this free of unwrap.
    let command = words.next().unwrap_or_default();
    let args: Vec<&str> = words.collect();
    let no_args = |cmd: Command, name: &'static str| {
        if args.is_empty() {
            Ok(Some(cmd))
        } else {
            Err(ParseError::BadArgs {
                command: name,
                expected: "no arguments",
            })
        }
    };
    let one_number = |name: &'static str, expected: &'static str| match args.as_slice() {
        [n] => n.parse::<u64>().map_err(|_| ParseError::BadArgs {
            command: name,
            expected,
        }),
        _ => Err(ParseError::BadArgs {
            command: name,
            expected,
        }),
    };
    match command.to_ascii_lowercase().as_str() {
        "pass" => no_args(Command::Set(Mode::Pass), "pass"),
        "drop" | "refuse" => no_args(Command::Set(Mode::Refuse), "drop"),
        "blackhole" => no_args(Command::Set(Mode::Blackhole), "blackhole"),
        "reset" => no_args(Command::Reset, "reset"),
        "stats" => no_args(Command::Stats, "stats"),
        "mode" => no_args(Command::Mode, "mode"),
        "delay" => {
            let ms = one_number("delay", "one whole number of milliseconds")?;
            Ok(Some(Command::Set(Mode::Delay(Duration::from_millis(ms)))))
        }
        "throttle" => {
            let bytes_per_sec = one_number("throttle", "one whole number of bytes per second")?;
            Ok(Some(Command::Set(Mode::Throttle { bytes_per_sec })))
        }
        _ => Err(ParseError::Unknown(command.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse_line("pass"), Ok(Some(Command::Set(Mode::Pass))));
        assert_eq!(parse_line(" DROP "), Ok(Some(Command::Set(Mode::Refuse))));
        assert_eq!(parse_line("refuse"), Ok(Some(Command::Set(Mode::Refuse))));
        assert_eq!(
            parse_line("blackhole"),
            Ok(Some(Command::Set(Mode::Blackhole)))
        );
        assert_eq!(
            parse_line("delay 250"),
            Ok(Some(Command::Set(Mode::Delay(Duration::from_millis(250)))))
        );
        assert_eq!(
            parse_line("throttle 10240"),
            Ok(Some(Command::Set(Mode::Throttle {
                bytes_per_sec: 10240
            })))
        );
        assert_eq!(parse_line("reset"), Ok(Some(Command::Reset)));
        assert_eq!(parse_line("stats"), Ok(Some(Command::Stats)));
        assert_eq!(parse_line("mode"), Ok(Some(Command::Mode)));
        assert_eq!(parse_line(""), Ok(None));
        assert_eq!(parse_line("# comment"), Ok(None));
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(matches!(parse_line("explode"), Err(ParseError::Unknown(_))));
        assert!(parse_line("delay").is_err());
        assert!(parse_line("delay -5").is_err());
        assert!(parse_line("delay 5 6").is_err());
        assert!(parse_line("throttle fast").is_err());
        assert!(parse_line("pass now").is_err());
    }

    #[test]
    fn mode_display_round_trips() {
        for mode in [
            Mode::Pass,
            Mode::Refuse,
            Mode::Blackhole,
            Mode::Delay(Duration::from_millis(42)),
            Mode::Throttle { bytes_per_sec: 7 },
        ] {
            assert_eq!(parse_line(&mode.to_string()), Ok(Some(Command::Set(mode))));
        }
    }
}
