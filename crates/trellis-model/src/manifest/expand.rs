//! Dependent variables: `$(NAME)` in a component's env values, `command`
//! and `args`, expanded by the rules of Kubernetes, which the platform our
//! users come from runs on — so a connection string such as
//! `postgresql://$(USER):$(PASSWORD)@$(DB_HOST):5432/app` means on an
//! outpost what it means there.
//!
//! The rules, for a `$` in the text:
//! - `$(NAME)` is replaced by the value of `NAME` when it is known, and left
//!   as written when it is not — so a shell's `$(date)` inside `sh -c`
//!   reaches the shell untouched;
//! - `$$` is one literal `$`, so `$$(NAME)` is the literal text `$(NAME)`;
//! - a `$(` without its `)` is kept as written;
//! - any other `$` is kept, with the character after it.
//!
//! Which names are known depends on where the text is: an env value sees
//! the variables defined **before** it in the component's env, `command`
//! and `args` see all of them (see [`env_value`] and [`command_word`]).
//! `command` and `args` also take `$NAME` and `${NAME}`, as the platform's
//! documentation shows them (`--db=$DB_HOST:$DB_PORT`); a name the env does
//! not have is left as written there too.
//!
//! Pure functions of their input, so the hub, the agent and every runtime
//! expand alike.

/// Expands an env `value` (or a `config-ref`'s default): `$(NAME)` and
/// `$$` only. `known` answers the value of a variable defined earlier in
/// the same component's env.
pub fn env_value<'a>(text: &str, known: impl Fn(&str) -> Option<&'a str>) -> String {
    expand(text, &known, false)
}

/// Expands a word of `command` or `args`: `$(NAME)`, `$NAME`, `${NAME}` and
/// `$$`. `known` answers the value of any variable of the component's env.
pub fn command_word<'a>(text: &str, known: impl Fn(&str) -> Option<&'a str>) -> String {
    expand(text, &known, true)
}

fn expand<'a>(text: &str, known: &dyn Fn(&str) -> Option<&'a str>, bare: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let mut chars = after.chars();
        let Some(next) = chars.next() else {
            // A `$` that ends the text stays.
            out.push('$');
            rest = after;
            break;
        };
        rest = match next {
            '$' => {
                out.push('$');
                chars.as_str()
            }
            '(' | '{' => {
                let close = if next == '(' { ')' } else { '}' };
                let inner = chars.as_str();
                match inner.find(close) {
                    Some(end) if next == '(' || bare => {
                        let name = &inner[..end];
                        let value = if next == '{' && !is_name(name) {
                            None
                        } else {
                            known(name)
                        };
                        match value {
                            Some(value) => out.push_str(value),
                            None => {
                                // `$`, the opener, the name and the closer.
                                out.push('$');
                                out.push_str(&after[..1 + end + 1]);
                            }
                        }
                        &inner[end + 1..]
                    }
                    // Unclosed, or `${` where only `$(` counts: as written.
                    _ => {
                        out.push('$');
                        out.push(next);
                        inner
                    }
                }
            }
            c if bare && (c == '_' || c.is_ascii_alphabetic()) => {
                let len = after
                    .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
                    .unwrap_or(after.len());
                let name = &after[..len];
                match known(name) {
                    Some(value) => out.push_str(value),
                    None => {
                        out.push('$');
                        out.push_str(name);
                    }
                }
                &after[len..]
            }
            other => {
                out.push('$');
                out.push(other);
                chars.as_str()
            }
        };
    }
    out.push_str(rest);
    out
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what `${NAME}` may hold.
fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }

    const KNOWN: &[(&str, &str)] = &[
        ("VAR_A", "A"),
        ("VAR_B", "B"),
        ("VAR_C", "C"),
        ("VAR_REF", "$(VAR_A)"),
        ("VAR_EMPTY", ""),
        ("DB_HOST", "db"),
        ("USER", "app"),
        ("PASSWORD", "s3cr3t"),
    ];

    /// Kubernetes' own rule table for dependent variables
    /// (`third_party/forked/golang/expansion`), as cases of `env_value`:
    /// (input, expected).
    const RULES: &[(&str, &str)] = &[
        // Whole and partial references.
        ("$(VAR_A)", "A"),
        ("___$(VAR_B)___", "___B___"),
        ("$(VAR_A)-$(VAR_A)", "A-A"),
        ("$(VAR_A)-1", "A-1"),
        ("$(VAR_A)_$(VAR_B)_$(VAR_C)", "A_B_C"),
        ("$(VAR_A)$(VAR_B)$(VAR_C)", "ABC"),
        ("f000-$$VAR_A", "f000-$VAR_A"),
        ("foo\\$(VAR_C)bar", "foo\\Cbar"),
        ("foo\\\\$(VAR_C)bar", "foo\\\\Cbar"),
        // A value is not expanded again.
        ("$(VAR_REF)", "$(VAR_A)"),
        ("$(VAR_EMPTY)", ""),
        ("foo$(VAR_EMPTY)bar", "foobar"),
        // Unknown names and broken references stay as written.
        ("$(VAR_DNE)", "$(VAR_DNE)"),
        ("foo$(VAR_DNE)bar", "foo$(VAR_DNE)bar"),
        ("$(date)", "$(date)"),
        ("$(VAR_A", "$(VAR_A"),
        ("$(VAR_A)$(", "A$("),
        ("$(", "$("),
        ("$()", "$()"),
        ("$(VAR A)", "$(VAR A)"),
        ("$(VAR_A$(VAR_B))", "$(VAR_A$(VAR_B))"),
        // Escapes.
        ("$$(VAR_A)", "$(VAR_A)"),
        ("$$$$(VAR_A)", "$$(VAR_A)"),
        ("$$$(VAR_A)", "$A"),
        ("$$$$$$(VAR_A)", "$$$(VAR_A)"),
        ("$$", "$"),
        ("$$$", "$$"),
        ("$$$$", "$$"),
        ("-$$$$-", "-$$-"),
        // A `$` that starts nothing.
        ("$", "$"),
        ("foo$", "foo$"),
        ("$VAR_A", "$VAR_A"),
        ("${VAR_A}", "${VAR_A}"),
        ("$ ", "$ "),
        ("$-$(VAR_A)", "$-A"),
        ("100$ off", "100$ off"),
        // Text around it, including non-ASCII.
        ("", ""),
        ("no references", "no references"),
        ("é$(VAR_A)€", "éA€"),
        ("$é$(VAR_B)", "$éB"),
        // Real shapes.
        (
            "postgresql://$(USER):$(PASSWORD)@$(DB_HOST):5432/app",
            "postgresql://app:s3cr3t@db:5432/app",
        ),
        (
            "{\"host\": \"$(DB_HOST)\", \"user\": \"$(USER)\"}",
            "{\"host\": \"db\", \"user\": \"app\"}",
        ),
    ];

    #[test]
    fn env_values_follow_the_kubernetes_rule_table() {
        let known = vars(KNOWN);
        for (input, want) in RULES {
            assert_eq!(env_value(input, &known), *want, "input {input:?}");
        }
    }

    #[test]
    fn command_words_follow_the_same_rules_for_references_and_escapes() {
        let known = vars(KNOWN);
        for (input, want) in RULES {
            // The bare forms are the only difference; skip the cases that
            // hold one after a `$`.
            let unescaped = input.replace("$$", "");
            if unescaped.contains("$V") || unescaped.contains("${") {
                continue;
            }
            assert_eq!(command_word(input, &known), *want, "input {input:?}");
        }
    }

    #[test]
    fn command_words_also_take_bare_and_braced_names() {
        let known = vars(KNOWN);
        let cases: &[(&str, &str)] = &[
            ("--db=$DB_HOST:5432", "--db=db:5432"),
            ("${DB_HOST}:${USER}", "db:app"),
            ("$DB_HOST$(USER)", "dbapp"),
            ("$$DB_HOST", "$DB_HOST"),
            ("$$(DB_HOST)", "$(DB_HOST)"),
            ("$MISSING x", "$MISSING x"),
            ("${MISSING}", "${MISSING}"),
            ("${not a name}", "${not a name}"),
            ("${unclosed", "${unclosed"),
            ("cost: $5", "cost: $5"),
            ("$1 $@ $?", "$1 $@ $?"),
            ("end$", "end$"),
            ("é$DB_HOST€", "édb€"),
            (
                "echo started at $(date) for $(DB_HOST)",
                "echo started at $(date) for db",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(command_word(input, &known), *want, "input {input:?}");
        }
    }

    #[test]
    fn nothing_is_known_means_nothing_changes_but_escapes() {
        let none = |_: &str| None::<&str>;
        for text in ["$(A)", "a$(B)c", "$(", "$x", "${y}", "plain", "€$"] {
            assert_eq!(env_value(text, none), text);
            assert_eq!(command_word(text, none), text);
        }
        assert_eq!(env_value("pa$$word", none), "pa$word");
    }
}
