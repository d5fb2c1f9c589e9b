//! Where an ingress is reachable: the host names an outpost's entry point
//! answers to.
//!
//! A manifest's ingress `host` is a prefix (`shop`), as on the platform our
//! users come from. On an outpost it becomes
//! `<prefix>.<stage>.<project>.<ingress domain>`: the stage and the project
//! are DNS labels and the domain is the outpost's, so reading a name from
//! the right gives back project, stage and prefix — two stages or projects
//! on one outpost can never be given the same host name. The ingress domain
//! is what the administrator sets on the outpost (`--ingress-domain
//! plant7.example.net`, with a DNS wildcard `*.plant7.example.net` pointing
//! at the outpost); without one it is `localhost`, whose subdomains
//! browsers and curl resolve to the loopback address, so an app on the
//! hub's own outpost or a developer's machine has a working URL at once.

/// The ingress domain of an outpost whose administrator set none.
pub const DEFAULT_INGRESS_DOMAIN: &str = "localhost";

/// The longest host name DNS allows.
const MAX_HOST_LEN: usize = 253;

/// The host name an ingress with host `prefix` of `stage` in `project`
/// answers to on an outpost with ingress `domain` (lowercase).
pub fn ingress_host(prefix: &str, stage: &str, project: &str, domain: &str) -> String {
    format!("{prefix}.{stage}.{project}.{domain}").to_ascii_lowercase()
}

/// Checks a host name the outpost's entry point would answer to; a
/// prefix, stage, project and domain that are each valid can still add up
/// to more than DNS allows.
pub fn check_ingress_host(host: &str) -> Result<(), String> {
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "the ingress host {host:?} is {} characters long, more than the {MAX_HOST_LEN} DNS allows; \
             use a shorter host prefix, stage or project name, or a shorter ingress domain",
            host.len()
        ));
    }
    Ok(())
}

/// Checks an ingress domain an administrator gives an outpost: a DNS name
/// (`plant7.example.net`, or `localhost`), lowercase letters, digits, '-'
/// and '.', leaving room for the names put before it.
pub fn validate_ingress_domain(domain: &str) -> Result<(), String> {
    const FORM: &str = "use a DNS name like plant7.example.net: dot-separated labels of lowercase letters, digits and '-', each at most 63 characters and not starting or ending with '-'";
    let bad = |why: &str| {
        Err(format!(
            "{domain:?} is not an ingress domain ({why}); {FORM}"
        ))
    };
    if domain.is_empty() {
        return bad("it is empty");
    }
    if domain.contains("://") || domain.contains('/') {
        return bad("it is a URL; give only the domain");
    }
    // Three labels of at most 63 characters and their dots go before it.
    if domain.len() > MAX_HOST_LEN - 3 * 64 {
        return bad(
            "it is longer than 61 characters, which leaves no room for the host prefix, stage and project",
        );
    }
    for label in domain.split('.') {
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
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return bad(
                "it contains a character other than lowercase letters, digits, '-' and '.'",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_put_stage_project_and_domain_after_the_prefix() {
        assert_eq!(
            ingress_host("Shop", "dev", "kasse", "plant7.example.net"),
            "shop.dev.kasse.plant7.example.net"
        );
        assert_eq!(
            ingress_host("shop", "prod", "kasse", DEFAULT_INGRESS_DOMAIN),
            "shop.prod.kasse.localhost"
        );
    }

    #[test]
    fn hosts_of_different_stages_and_projects_never_collide() {
        // Names that would collide if joined with '-' stay apart.
        let a = ingress_host("a-b", "c", "d", "x.net");
        let b = ingress_host("a", "b-c", "d", "x.net");
        let c = ingress_host("a", "b", "c-d", "x.net");
        assert!(a != b && b != c && a != c);
    }

    #[test]
    fn domains_are_dns_names_with_room_left() {
        for good in ["localhost", "plant7.example.net", "a-b.c1"] {
            assert_eq!(validate_ingress_domain(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("https://x.net", "URL"),
            ("Plant7.example.net", "lowercase"),
            ("a..b", "empty label"),
            ("-a.b", "starts or ends"),
            (&"a.".repeat(40), "longer than 61"),
        ] {
            let err = validate_ingress_domain(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(check_ingress_host(&"a".repeat(254)).is_err());
    }
}
