//! The rules for single manifest values (schedules, time zones, paths, host
//! names, variable names), each returning a message that says what is wrong
//! and what is expected. Kept apart from the schema walker so each rule can
//! be tested on its own.

use std::str::FromStr;

use croner::parser::{CronParser, Seconds, Year};

use super::Schedule;

const CRON_FORM: &str = "use 5 fields (minute hour day-of-month month day-of-week) like \"*/5 * * * *\" or \"0 3 * * 1-5\", a nickname like @daily, or @release to run once per release";

/// The cron nicknames that stand for a five-field schedule.
const CRON_NICKNAMES: [&str; 6] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

impl FromStr for Schedule {
    type Err = String;

    /// Parses `@release` or a standard five-field cron expression (or one of
    /// its nicknames such as `@daily`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text == "@release" {
            return Ok(Schedule::OnRelease);
        }
        if text.starts_with('@') {
            if CRON_NICKNAMES.contains(&text) {
                return Ok(Schedule::Cron(text.to_owned()));
            }
            return Err(format!("{text:?} is not a schedule; {CRON_FORM}"));
        }
        // croner also takes six and seven fields (seconds, years); the
        // platform's schedules are the classic five, and a sixth field is
        // far more often a mistake than an intended seconds field.
        let fields = text.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "{text:?} has {fields} field{}, not 5; {CRON_FORM}",
                if fields == 1 { "" } else { "s" }
            ));
        }
        check_cron_ranges(text)?;
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        match parser.parse(text) {
            Ok(_) => Ok(Schedule::Cron(text.to_owned())),
            Err(err) => Err(format!(
                "{text:?} is not a valid cron schedule ({err}); {CRON_FORM}"
            )),
        }
    }
}

/// Names the field of a number out of its range (croner only says "Number
/// out of bounds"), so the message can point at the mistake.
fn check_cron_ranges(text: &str) -> Result<(), String> {
    const FIELDS: [(&str, u32, u32); 5] = [
        ("minute", 0, 59),
        ("hour", 0, 23),
        ("day-of-month", 1, 31),
        ("month", 1, 12),
        ("day-of-week", 0, 7),
    ];
    for (field, (what, low, high)) in text.split_whitespace().zip(FIELDS) {
        // Numbers after '/' are steps, not values.
        for part in field.split(',') {
            let values = part.split('/').next().unwrap_or(part);
            for number in values.split('-') {
                if let Ok(n) = number.parse::<u32>()
                    && !(low..=high).contains(&n)
                {
                    return Err(format!(
                        "{text:?} has {n} as its {what}, which must be {low}-{high}; {CRON_FORM}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks an IANA time zone name such as `Europe/Zurich`.
pub(crate) fn check_timezone(text: &str) -> Result<(), String> {
    if chrono_tz::Tz::from_str(text).is_ok() {
        return Ok(());
    }
    let names: Vec<&str> = chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect();
    let hint = closest(text, &names)
        .map(|name| format!("did you mean {name}? "))
        .unwrap_or_default();
    Err(format!(
        "{text:?} is not an IANA time zone name; {hint}use a name like Europe/Zurich, America/New_York or UTC"
    ))
}

/// Checks a directory of the project (for `process.path`): it is packaged
/// into the build, so it must stay inside the project.
pub(crate) fn check_project_path(text: &str) -> Result<(), String> {
    const FORM: &str = "use a directory relative to the project root, like ./bin or dist/app";
    if text.trim().is_empty() {
        return Err(format!("the path is empty; {FORM}"));
    }
    let bytes = text.as_bytes();
    let windows_drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    if text.starts_with(['/', '\\']) || windows_drive {
        return Err(format!("{text:?} is an absolute path; {FORM}"));
    }
    if text.split(['/', '\\']).any(|part| part == "..") {
        return Err(format!("{text:?} leaves the project through '..'; {FORM}"));
    }
    if text.contains('\0') {
        return Err(format!("{text:?} contains a NUL character; {FORM}"));
    }
    Ok(())
}

/// Checks a path inside the container (for `files` and `storage`).
pub(crate) fn check_container_path(text: &str) -> Result<(), String> {
    const FORM: &str = "use an absolute path inside the container, like /etc/app/config.toml";
    if !text.starts_with('/') {
        return Err(format!("{text:?} is not an absolute path; {FORM}"));
    }
    if text.split('/').any(|part| part == "..") {
        return Err(format!("{text:?} contains '..'; {FORM}"));
    }
    if text.contains('\0') {
        return Err(format!("{text:?} contains a NUL character; {FORM}"));
    }
    if text == "/" {
        return Err(format!("\"/\" is the container's root; {FORM}"));
    }
    Ok(())
}

/// Checks a host name an ingress answers to, such as `shop.example.com`.
pub(crate) fn check_hostname(text: &str) -> Result<(), String> {
    const FORM: &str = "use a DNS host name like shop.example.com: dot-separated labels of letters, digits and '-', each at most 63 characters and not starting or ending with '-'";
    let bad = |why: &str| Err(format!("{text:?} is not a host name ({why}); {FORM}"));
    if text.is_empty() {
        return bad("it is empty");
    }
    if text.len() > 253 {
        return bad("it is longer than 253 characters");
    }
    if text.contains("://") {
        return bad("it is a URL; give only the host");
    }
    for label in text.split('.') {
        if label.is_empty() {
            return bad("it has an empty label");
        }
        if label.len() > 63 {
            return bad("a label is longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a label starts or ends with '-'");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("it contains a character other than letters, digits, '-' and '.'");
        }
    }
    Ok(())
}

/// Checks an ingress host as the platform writes it: a prefix of one DNS
/// label (`shop`), to which the outpost adds the stage, the project and its
/// ingress domain.
pub(crate) fn check_host_prefix(text: &str) -> Result<(), String> {
    const FORM: &str = "use one DNS label like shop: letters, digits and '-', at most 63 characters, not starting or ending with '-'; the outpost adds the stage, the project and its ingress domain";
    let bad = |why: &str| Err(format!("{text:?} is not a host prefix ({why}); {FORM}"));
    if text.contains("://") {
        return bad("it is a URL");
    }
    if text.contains('.') {
        return bad("it has dots: the host is a prefix, not a whole host name");
    }
    if text.is_empty() {
        return bad("it is empty");
    }
    if text.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if text.starts_with('-') || text.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    if !text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return bad("it contains a character other than letters, digits and '-'");
    }
    Ok(())
}

/// Checks an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, the set
/// every shell and `$VAR` expansion in `args` understand.
pub(crate) fn check_env_name(text: &str) -> Result<(), String> {
    const FORM: &str = "use letters, digits and '_', not starting with a digit, like DATABASE_URL";
    let mut bytes = text.bytes();
    match bytes.next() {
        None => Err(format!("the variable name is empty; {FORM}")),
        Some(first) if !(first.is_ascii_alphabetic() || first == b'_') => Err(format!(
            "{text:?} is not an environment variable name (it starts with {:?}); {FORM}",
            char::from(first)
        )),
        Some(_) if !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') => Err(format!(
            "{text:?} is not an environment variable name; {FORM}"
        )),
        Some(_) => Ok(()),
    }
}

/// Checks the URL path prefix of an ingress.
pub(crate) fn check_url_path(text: &str) -> Result<(), String> {
    if !text.starts_with('/') {
        return Err(format!(
            "{text:?} does not start with '/'; use a URL path like /api"
        ));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{text:?} contains white space; use a URL path like /api"
        ));
    }
    if let Some(c) = text.chars().find(|c| matches!(c, '?' | '#' | ';')) {
        return Err(format!(
            "{text:?} contains {c:?}, which ends a URL's path; an ingress routes by path prefix only, like /api"
        ));
    }
    Ok(())
}

/// The closest of `candidates` to `word` if it is close enough to be a
/// plausible typo, for "did you mean" hints.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev + cost);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_accepts_standard_five_field_schedules() {
        for ok in [
            "*/5 * * * *",
            "0 3 * * 1-5",
            "30 2 1 * *",
            "0 0 * * SUN",
            "15,45 8-18 * JAN-MAR MON-FRI",
            "  0 * * * *  ",
            "@daily",
            "@hourly",
        ] {
            assert!(
                matches!(ok.parse::<Schedule>(), Ok(Schedule::Cron(_))),
                "{ok}: {:?}",
                ok.parse::<Schedule>()
            );
        }
        assert_eq!("@release".parse::<Schedule>(), Ok(Schedule::OnRelease));
    }

    #[test]
    fn cron_errors_name_the_field_out_of_range() {
        let err = "0 25 * * *".parse::<Schedule>().unwrap_err();
        assert!(err.contains("25 as its hour, which must be 0-23"), "{err}");
        let err = "*/5 * * * 1-9".parse::<Schedule>().unwrap_err();
        assert!(err.contains("9 as its day-of-week"), "{err}");
    }

    #[test]
    fn cron_rejects_malformed_schedules_with_the_expected_form() {
        for bad in [
            "",
            "* * * *",
            "0 0 * * * *",
            "61 * * * *",
            "0 25 * * *",
            "0 0 32 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "0 0 0 * *",
            "0-60 * * * *",
            "every day",
            "*/x * * * *",
            "@reboot",
            "@releases",
        ] {
            let err = bad.parse::<Schedule>().unwrap_err();
            assert!(err.contains("*/5 * * * *"), "{bad}: {err}");
        }
    }

    #[test]
    fn timezones_are_real_iana_names() {
        for ok in ["UTC", "Europe/Zurich", "America/New_York", "Asia/Kolkata"] {
            assert!(check_timezone(ok).is_ok(), "{ok}");
        }
        assert!(check_timezone("Mars/Olympus").is_err());
        assert!(check_timezone("").is_err());
        let err = check_timezone("europe/zurich").unwrap_err();
        assert!(err.contains("did you mean Europe/Zurich"), "{err}");
        let err = check_timezone("Europe/Zurch").unwrap_err();
        assert!(err.contains("did you mean Europe/Zurich"), "{err}");
    }

    #[test]
    fn project_paths_stay_inside_the_project() {
        for ok in [".", "./bin", "bin", "dist/app", "a/./b", "..foo/bar"] {
            assert!(check_project_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/opt/app",
            "\\srv",
            "C:\\app",
            "..",
            "../x",
            "a/../../b",
            "a\\..\\b",
        ] {
            assert!(check_project_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn container_paths_are_absolute() {
        assert!(check_container_path("/etc/app.toml").is_ok());
        for bad in ["etc/app", "", "/", "/a/../b", "./x"] {
            assert!(check_container_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames() {
        for ok in [
            "localhost",
            "shop.example.com",
            "a-b.c1.io",
            "API.Example.com",
        ] {
            assert!(check_hostname(ok).is_ok(), "{ok}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        for bad in [
            "",
            "https://shop.example.com",
            "shop..example.com",
            "-a.com",
            "a-.com",
            "shop_1.example.com",
            "*.example.com",
            "example.com.",
            long_label.as_str(),
        ] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_x", "DATABASE_URL", "a1"] {
            assert!(check_env_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "ÄRGER"] {
            assert!(check_env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn url_paths() {
        assert!(check_url_path("/").is_ok());
        assert!(check_url_path("/api/v1").is_ok());
        assert!(check_url_path("api").is_err());
        assert!(check_url_path("/a b").is_err());
    }

    #[test]
    fn typo_suggestions() {
        let fields = ["image", "file", "build-context", "build-args", "platform"];
        assert_eq!(closest("imgae", &fields), Some("image"));
        assert_eq!(closest("build-arg", &fields), Some("build-args"));
        assert_eq!(closest("IMAGE", &fields), Some("image"));
        assert_eq!(closest("context", &fields), None);
        assert_eq!(closest("x", &fields), None);
    }
}
