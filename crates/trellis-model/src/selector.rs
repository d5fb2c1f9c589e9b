//! Label selectors: which outposts (and so which stages) a command means,
//! by the labels the outposts were given at `create outpost`.
//!
//! The syntax is Kubernetes': requirements separated by commas, all of
//! which must hold.
//!
//! | requirement      | holds when the outpost …                        |
//! |------------------|-------------------------------------------------|
//! | `k=v`, `k==v`    | has label `k` with value `v`                    |
//! | `k!=v`           | has no label `k`, or one with another value     |
//! | `k in (a,b)`     | has label `k` with value `a` or `b`             |
//! | `k notin (a,b)`  | has no label `k`, or one with neither value     |
//! | `k`              | has label `k` (any value)                       |
//! | `!k`             | has no label `k`                                |
//!
//! Keys are label keys (letters, digits, `-`, `_`, `.`, `/`; at most 63).
//! A value is written plain (any characters but white space and
//! `,()=!"`) or in double quotes, where `\"` and `\\` stand for `"` and
//! `\` — for the values a plain word cannot spell (`site="Hall B"`).
//! Errors name the character (counted from 1) where the selector stops
//! making sense.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// The longest selector accepted, in bytes: more is a mistake, not a fleet.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// Whether `s` is a valid label key (what `create outpost --label` takes).
pub fn is_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// One requirement of a [`Selector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        }
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(self.key());
        match self {
            Requirement::Equals(_, v) => value == Some(v),
            Requirement::NotEquals(_, v) => value != Some(v),
            Requirement::In(_, set) => value.is_some_and(|v| set.contains(v)),
            Requirement::NotIn(_, set) => !value.is_some_and(|v| set.contains(v)),
            Requirement::Exists(_) => value.is_some(),
            Requirement::NotExists(_) => value.is_none(),
        }
    }
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        Parser::new(text).selector()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether an outpost with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Selector::parse(s)
    }
}

/// Writes a value plain when it can be read back plain, else quoted.
fn write_value(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    if !v.is_empty() && v.chars().all(is_plain) {
        return f.write_str(v);
    }
    f.write_str("\"")?;
    for c in v.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

fn write_set(f: &mut fmt::Formatter<'_>, set: &BTreeSet<String>) -> fmt::Result {
    f.write_str("(")?;
    for (i, v) in set.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write_value(f, v)?;
    }
    f.write_str(")")
}

/// The canonical text, which parses back to the same selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Equals(k, v) => {
                    write!(f, "{k}=")?;
                    write_value(f, v)?;
                }
                Requirement::NotEquals(k, v) => {
                    write!(f, "{k}!=")?;
                    write_value(f, v)?;
                }
                Requirement::In(k, set) => {
                    write!(f, "{k} in ")?;
                    write_set(f, set)?;
                }
                Requirement::NotIn(k, set) => {
                    write!(f, "{k} notin ")?;
                    write_set(f, set)?;
                }
                Requirement::Exists(k) => f.write_str(k)?,
                Requirement::NotExists(k) => write!(f, "!{k}")?,
            }
        }
        Ok(())
    }
}

/// Why a selector was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label selector {text:?}, at character {position}: {message}")]
pub struct SelectorError {
    pub text: String,
    /// Counted in characters from 1; one past the end when the selector
    /// stopped too early.
    pub position: usize,
    pub message: String,
}

/// A character a plain (unquoted) value may hold.
fn is_plain(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !matches!(c, ',' | '(' | ')' | '=' | '!' | '"' | '\\')
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

const EXAMPLE: &str = "e.g. site=munich,line!=3 or site in (munich,hamburg)";

struct Parser<'a> {
    text: &'a str,
    chars: Vec<char>,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            text,
            chars: text.chars().collect(),
            at: 0,
        }
    }

    fn fail<T>(&self, at: usize, message: impl Into<String>) -> Result<T, SelectorError> {
        Err(SelectorError {
            text: self.text.to_owned(),
            position: at + 1,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn selector(mut self) -> Result<Selector, SelectorError> {
        if self.text.len() > MAX_SELECTOR_LEN {
            return self.fail(
                0,
                format!(
                    "it is {} bytes long; a selector takes at most {MAX_SELECTOR_LEN}",
                    self.text.len()
                ),
            );
        }
        self.skip_space();
        if self.peek().is_none() {
            return self.fail(
                0,
                format!("the selector is empty; give at least one requirement, {EXAMPLE}"),
            );
        }
        let mut requirements = Vec::new();
        loop {
            requirements.push(self.requirement()?);
            self.skip_space();
            match self.peek() {
                None => break,
                Some(',') => {
                    self.at += 1;
                    self.skip_space();
                    if self.peek().is_none() {
                        return self.fail(self.at, "a requirement is missing after the last ','");
                    }
                }
                Some(c) => {
                    return self.fail(
                        self.at,
                        format!("expected ',' between requirements, found {c:?}"),
                    );
                }
            }
        }
        Ok(Selector { requirements })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        let start = self.at;
        while self.peek().is_some_and(is_key_char) {
            self.at += 1;
        }
        if self.at == start {
            return match self.peek() {
                None => self.fail(start, format!("a label key is missing, {EXAMPLE}")),
                Some(c) => self.fail(
                    start,
                    format!(
                        "expected a label key (letters, digits, '-', '_', '.', '/'), found {c:?}"
                    ),
                ),
            };
        }
        let key: String = self.chars[start..self.at].iter().collect();
        if key.len() > 63 {
            return self.fail(start, "a label key is at most 63 characters long");
        }
        Ok(key)
    }

    /// A word of letters right here (`in`, `notin`), if one is.
    fn word(&self) -> String {
        self.chars[self.at..]
            .iter()
            .take_while(|c| c.is_ascii_alphabetic())
            .collect()
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.eat('!') {
            self.skip_space();
            let key = self.key()?;
            return Ok(Requirement::NotExists(key));
        }
        let key = self.key()?;
        let after_key = self.at;
        self.skip_space();
        match self.peek() {
            None | Some(',') => Ok(Requirement::Exists(key)),
            Some('=') => {
                self.at += 1;
                self.eat('=');
                Ok(Requirement::Equals(key, self.value()?))
            }
            Some('!') => {
                self.at += 1;
                if !self.eat('=') {
                    return self.fail(self.at, "expected '=' after '!' (k!=v)");
                }
                Ok(Requirement::NotEquals(key, self.value()?))
            }
            Some(_) if self.at > after_key => {
                let word = self.word();
                let op_at = self.at;
                match word.as_str() {
                    "in" | "notin" => {
                        self.at += word.len();
                        let set = self.set()?;
                        Ok(if word == "in" {
                            Requirement::In(key, set)
                        } else {
                            Requirement::NotIn(key, set)
                        })
                    }
                    _ => self.fail(
                        op_at,
                        format!("expected '=', '!=', 'in' or 'notin' after the key {key:?}"),
                    ),
                }
            }
            Some(c) => self.fail(
                self.at,
                format!("expected '=', '!=', 'in' or 'notin' after the key {key:?}, found {c:?}"),
            ),
        }
    }

    fn set(&mut self) -> Result<BTreeSet<String>, SelectorError> {
        self.skip_space();
        if !self.eat('(') {
            return self.fail(
                self.at,
                "expected '(' to open the set of values, e.g. (a,b)",
            );
        }
        let mut set = BTreeSet::new();
        loop {
            set.insert(self.value()?);
            self.skip_space();
            match self.peek() {
                Some(',') => self.at += 1,
                Some(')') => {
                    self.at += 1;
                    return Ok(set);
                }
                None => return self.fail(self.at, "the set of values is not closed with ')'"),
                Some(c) => {
                    return self.fail(
                        self.at,
                        format!("expected ',' or ')' in the set of values, found {c:?}"),
                    );
                }
            }
        }
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        self.skip_space();
        let start = self.at;
        if self.eat('"') {
            let mut value = String::new();
            loop {
                match self.peek() {
                    None => return self.fail(start, "the quoted value is not closed with '\"'"),
                    Some('"') => {
                        self.at += 1;
                        return Ok(value);
                    }
                    Some('\\') => {
                        self.at += 1;
                        match self.peek() {
                            Some(c @ ('"' | '\\')) => {
                                value.push(c);
                                self.at += 1;
                            }
                            _ => {
                                return self.fail(
                                    self.at - 1,
                                    "in a quoted value '\\' is written before '\"' or '\\' only",
                                );
                            }
                        }
                    }
                    Some(c) => {
                        value.push(c);
                        self.at += 1;
                    }
                }
            }
        }
        while self.peek().is_some_and(is_plain) {
            self.at += 1;
        }
        if self.at == start {
            return match self.peek() {
                None => self.fail(start, "a value is missing at the end"),
                Some(c) => self.fail(
                    start,
                    format!("expected a value, found {c:?} (quote values that hold it: \"…\")"),
                ),
            };
        }
        Ok(self.chars[start..self.at].iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_form_selects_as_kubernetes_does() {
        let munich3 = labels(&[("site", "munich"), ("line", "3")]);
        let hamburg = labels(&[("site", "hamburg")]);
        let bare = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("site=munich", [true, false, false]),
            ("site==munich", [true, false, false]),
            ("site!=munich", [false, true, true]),
            ("site in (munich, hamburg)", [true, true, false]),
            ("site notin (munich)", [false, true, true]),
            ("line", [true, false, false]),
            ("!line", [false, true, true]),
            ("site=munich,line!=3", [false, false, false]),
            ("site in (munich,hamburg),!line", [false, true, false]),
            (" site = munich , line = 3 ", [true, false, false]),
            ("site in(hamburg)", [false, true, false]),
        ];
        for (text, expect) in cases {
            let s = sel(text);
            let got = [s.matches(&munich3), s.matches(&hamburg), s.matches(&bare)];
            assert_eq!(&got, expect, "{text}");
        }
    }

    #[test]
    fn quoted_values_hold_what_plain_ones_cannot() {
        let s = sel(r#"hall="B, north",note="say \"hi\"""#);
        assert!(s.matches(&labels(&[("hall", "B, north"), ("note", "say \"hi\"")])));
        assert_eq!(s.to_string(), r#"hall="B, north",note="say \"hi\"""#);
        assert!(sel(r#"k="""#).matches(&labels(&[("k", "")])));
    }

    #[test]
    fn errors_name_the_position_and_what_was_expected() {
        let cases = [
            ("", 1, "empty"),
            ("   ", 1, "empty"),
            ("site=", 6, "value is missing"),
            ("site=munich,", 13, "missing after the last ','"),
            ("site=munich line=3", 13, "expected ','"),
            ("site in munich", 9, "expected '('"),
            ("site in (a,b", 13, "not closed"),
            ("site ~ a", 6, "expected '=', '!=', 'in' or 'notin'"),
            ("site among (a)", 6, "expected '=', '!=', 'in' or 'notin'"),
            ("=a", 1, "expected a label key"),
            ("s!a", 3, "expected '=' after '!'"),
            ("k=\"open", 3, "not closed"),
            ("k=\"a\\n\"", 5, "'\\' is written before"),
            ("k=(a)", 3, "expected a value"),
            ("ä=1", 1, "expected a label key"),
        ];
        for (text, position, words) in cases {
            let e = Selector::parse(text).unwrap_err();
            assert_eq!(e.position, position, "{text}: {e}");
            assert!(e.to_string().contains(words), "{text}: {e}");
        }
        let long = format!("k={}", "a".repeat(MAX_SELECTOR_LEN));
        assert!(Selector::parse(&long).is_err());
        assert!(
            Selector::parse(&"k".repeat(64))
                .unwrap_err()
                .message
                .contains("63")
        );
    }

    fn key() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9./_-]{0,20}"
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9.-]{1,8}",
            any::<String>().prop_map(|s| s.replace('\0', ""))
        ]
    }

    fn values() -> impl Strategy<Value = BTreeSet<String>> {
        prop::collection::btree_set(value(), 1..4)
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        prop_oneof![
            (key(), value()).prop_map(|(k, v)| Requirement::Equals(k, v)),
            (key(), value()).prop_map(|(k, v)| Requirement::NotEquals(k, v)),
            (key(), values()).prop_map(|(k, v)| Requirement::In(k, v)),
            (key(), values()).prop_map(|(k, v)| Requirement::NotIn(k, v)),
            key().prop_map(Requirement::Exists),
            key().prop_map(Requirement::NotExists),
        ]
    }

    fn selector() -> impl Strategy<Value = Selector> {
        prop::collection::vec(requirement(), 1..5)
            .prop_map(|requirements| Selector { requirements })
    }

    fn label_set() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(prop_oneof![key(), Just("site".to_string())], value(), 0..4)
    }

    /// The opposite requirement: holds exactly when `r` does not.
    fn negated(r: &Requirement) -> Requirement {
        match r.clone() {
            Requirement::Equals(k, v) => Requirement::NotEquals(k, v),
            Requirement::NotEquals(k, v) => Requirement::Equals(k, v),
            Requirement::In(k, s) => Requirement::NotIn(k, s),
            Requirement::NotIn(k, s) => Requirement::In(k, s),
            Requirement::Exists(k) => Requirement::NotExists(k),
            Requirement::NotExists(k) => Requirement::Exists(k),
        }
    }

    proptest! {
        #[test]
        fn display_round_trips_through_parse(s in selector()) {
            let text = s.to_string();
            let back = Selector::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.to_string(), text);
        }

        #[test]
        fn parsing_anything_never_panics_and_errors_point_inside(text in ".{0,40}") {
            if let Err(e) = Selector::parse(&text) {
                prop_assert!(e.position >= 1 && e.position <= text.chars().count() + 1, "{e}");
            }
        }

        #[test]
        fn each_form_and_its_opposite_split_every_outpost(r in requirement(), l in label_set()) {
            prop_assert_ne!(r.matches(&l), negated(&r).matches(&l));
        }

        #[test]
        fn a_comma_is_and(a in selector(), b in selector(), l in label_set()) {
            let both = Selector::parse(&format!("{a},{b}")).unwrap();
            prop_assert_eq!(both.matches(&l), a.matches(&l) && b.matches(&l));
        }

        #[test]
        fn equals_and_in_read_the_label(k in key(), v in value(), l in label_set()) {
            let eq = Requirement::Equals(k.clone(), v.clone());
            prop_assert_eq!(eq.matches(&l), l.get(&k) == Some(&v));
            let set = Requirement::In(k.clone(), [v.clone()].into());
            prop_assert_eq!(set.matches(&l), eq.matches(&l));
        }
    }
}
