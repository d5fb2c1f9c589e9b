//! Routes: what the agent hands us, the checks on them, and the compiled
//! table requests are looked up in.
//!
//! The table is built once per `set_routes` (host → routes sorted longest
//! prefix first, each endpoint resolved to its shared health and pool
//! state), so a request does one hash lookup and a short scan, and
//! allocates nothing.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use crate::endpoint::{Endpoint, Registry};

/// One thing the ingress answers for: requests to `host` whose path starts
/// with `path` (on a segment boundary) go to one of `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The full host name, lowercase, without a trailing dot, e.g.
    /// `web.dev.shop.plant7.example.net`.
    pub host: String,
    /// A path prefix starting with `/`, matched on segment boundaries like
    /// Kubernetes' `Prefix`: `/api` matches `/api` and `/api/x`, not
    /// `/apix`; `/` matches every path. A trailing `/` makes no difference.
    pub path: String,
    /// Keep each client on one endpoint with a cookie.
    pub sticky: bool,
    /// The replicas that are up; may be empty (requests then get a 503).
    pub endpoints: Vec<SocketAddr>,
    /// Who serves the route, for error pages and logs, e.g. `component web
    /// of stage dev (project shop)`.
    pub owner: String,
}

impl Default for Route {
    /// A route for every path (`/`), not sticky, no endpoint, no host yet.
    fn default() -> Self {
        Route {
            host: String::new(),
            path: "/".to_owned(),
            sticky: false,
            endpoints: Vec::new(),
            owner: String::new(),
        }
    }
}

/// Why `set_routes` refused a table; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error(
        "route {index} ({owner}) has the host {host:?}, which is not a host name: {reason}; \
         a host is lowercase DNS labels (a-z, 0-9 and '-', at most 63 characters each) \
         joined by dots, e.g. web.dev.shop.example.net"
    )]
    InvalidHost {
        /// Position of the route in the list given to `set_routes`.
        index: usize,
        host: String,
        owner: String,
        reason: String,
    },
    #[error(
        "route {index} ({owner}) for host {host} has the path {path:?}, which is not a path \
         prefix: {reason}; a prefix starts with '/' (\"/\" for every path, or e.g. \"/api\")"
    )]
    InvalidPath {
        index: usize,
        host: String,
        path: String,
        owner: String,
        reason: String,
    },
    #[error(
        "routes {first} ({first_owner}) and {second} ({second_owner}) both claim host {host} \
         path {path} (a trailing '/' does not make another path); each host and path has one \
         owner: drop one of the routes or give it another path"
    )]
    Duplicate {
        first: usize,
        second: usize,
        host: String,
        path: String,
        first_owner: String,
        second_owner: String,
    },
}

// === the compiled table ===

/// The routes as requests use them. Swapped whole by `set_routes`; a
/// request keeps the `Arc<Table>` it started with.
pub(crate) struct Table {
    /// The routes as given, for `Ingress::routes`.
    pub(crate) routes: Arc<[Route]>,
    hosts: HashMap<Box<str>, Vec<Compiled>>,
    /// Counts table swaps: a request whose every endpoint failed retries
    /// once on a newer table (it raced a release's swap).
    pub(crate) generation: u64,
}

/// One route, ready for requests.
pub(crate) struct Compiled {
    /// The prefix without a trailing '/' (except for the root, "/"); also
    /// the `Path` of the sticky cookie.
    pub(crate) prefix: Box<str>,
    pub(crate) sticky: bool,
    pub(crate) endpoints: Box<[Arc<Endpoint>]>,
    pub(crate) owner: Box<str>,
    /// Round-robin position.
    pub(crate) next: AtomicUsize,
}

pub(crate) enum Lookup<'t> {
    Found(&'t Compiled),
    UnknownHost,
    /// The host is served, but on other paths (listed in the 404 page).
    UnknownPath(&'t [Compiled]),
}

impl Table {
    pub(crate) fn empty() -> Self {
        Table {
            routes: Arc::from(Vec::new()),
            hosts: HashMap::new(),
            generation: 0,
        }
    }

    /// Checks `routes` and builds the table; `registry` gives each endpoint
    /// its shared state (health, pool, in-flight count), kept across swaps.
    pub(crate) fn build(
        routes: Vec<Route>,
        registry: &Registry,
        generation: u64,
    ) -> Result<Self, RouteError> {
        let mut hosts: HashMap<Box<str>, Vec<Compiled>> = HashMap::new();
        // (host, prefix) → index of the route that claimed it first.
        let mut claimed: HashMap<(&str, &str), usize> = HashMap::new();
        let mut prefixes = Vec::with_capacity(routes.len());
        for (index, route) in routes.iter().enumerate() {
            if let Err(reason) = check_route_host(&route.host) {
                return Err(RouteError::InvalidHost {
                    index,
                    host: route.host.clone(),
                    owner: route.owner.clone(),
                    reason,
                });
            }
            let prefix = match normalize_route_path(&route.path) {
                Ok(prefix) => prefix,
                Err(reason) => {
                    return Err(RouteError::InvalidPath {
                        index,
                        host: route.host.clone(),
                        path: route.path.clone(),
                        owner: route.owner.clone(),
                        reason,
                    });
                }
            };
            prefixes.push(prefix);
        }
        for (index, (route, prefix)) in routes.iter().zip(&prefixes).enumerate() {
            match claimed.entry((route.host.as_str(), prefix)) {
                Entry::Occupied(first) => {
                    let first = *first.get();
                    return Err(RouteError::Duplicate {
                        first,
                        second: index,
                        host: route.host.clone(),
                        path: prefix.to_string(),
                        first_owner: routes[first].owner.clone(),
                        second_owner: route.owner.clone(),
                    });
                }
                Entry::Vacant(slot) => {
                    slot.insert(index);
                }
            }
        }
        drop(claimed);
        for (route, prefix) in routes.iter().zip(prefixes) {
            let endpoints = route
                .endpoints
                .iter()
                .map(|addr| registry.endpoint(*addr))
                .collect();
            hosts
                .entry(route.host.as_str().into())
                .or_default()
                .push(Compiled {
                    prefix: prefix.into(),
                    sticky: route.sticky,
                    endpoints,
                    owner: route.owner.as_str().into(),
                    next: AtomicUsize::new(0),
                });
        }
        for compiled in hosts.values_mut() {
            // Longest prefix first: the first match is the best one.
            compiled.sort_by_key(|c| std::cmp::Reverse(c.prefix.len()));
        }
        Ok(Table {
            routes: Arc::from(routes),
            hosts,
            generation,
        })
    }

    /// `host` normalized by `request_host`.
    pub(crate) fn lookup(&self, host: &str, path: &str) -> Lookup<'_> {
        let Some(compiled) = self.hosts.get(host) else {
            return Lookup::UnknownHost;
        };
        match compiled.iter().find(|c| prefix_matches(&c.prefix, path)) {
            Some(found) => Lookup::Found(found),
            None => Lookup::UnknownPath(compiled),
        }
    }
}

/// Kubernetes `Prefix` matching: element-wise on '/'-separated segments.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The strict check on a route's host: what the agent gives us comes from
/// DNS-label names, so anything else is a bug worth refusing loudly.
fn check_route_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("it is empty".to_owned());
    }
    if host.len() > 253 {
        return Err(format!(
            "it is {} characters long, at most 253 are allowed",
            host.len()
        ));
    }
    if host.ends_with('.') {
        return Err(format!(
            "it ends with a dot; write it as {:?}",
            host.trim_end_matches('.')
        ));
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "it has upper-case letters; write it as {:?}",
            host.to_ascii_lowercase()
        ));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (two dots in a row, or a leading dot)".to_owned());
        }
        if label.len() > 63 {
            return Err(format!("the label {label:?} is longer than 63 characters"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
        {
            return Err(format!("the label {label:?} has the character {bad:?}"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("the label {label:?} starts or ends with '-'"));
        }
    }
    Ok(())
}

/// A route's path as the matcher uses it: no trailing '/' except for the
/// root.
fn normalize_route_path(path: &str) -> Result<&str, String> {
    if !path.starts_with('/') {
        return Err("it does not start with '/'".to_owned());
    }
    if let Some(bad) = path
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | ';'))
    {
        // '?' and '#' end a path; ';' would end the sticky cookie's Path.
        return Err(format!(
            "it has the character {bad:?}, which a path prefix cannot have"
        ));
    }
    let trimmed = path.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed })
}

/// Why a request's host cannot be routed (a 400).
#[derive(Debug)]
pub(crate) struct BadHost(pub(crate) String);

/// The host a request names, as the table keys it: lowercase, without the
/// port and a trailing dot. Borrowed when already in that form (the usual
/// case), so routing allocates nothing.
pub(crate) fn request_host(raw: &str) -> Result<Cow<'_, str>, BadHost> {
    if raw.is_empty() {
        return Err(BadHost("it is empty".to_owned()));
    }
    let name = if let Some(rest) = raw.strip_prefix('[') {
        // An IPv6 literal: nothing serves it, but it is well-formed (a 404,
        // not a 400).
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(BadHost(
                "it opens an IPv6 address with '[' but has no ']'".to_owned(),
            ));
        };
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(BadHost(format!("{inside:?} is not an IPv6 address")));
        }
        let port = match after {
            "" => None,
            after => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(BadHost(format!("{after:?} follows the IPv6 address"))),
            },
        };
        check_port(port)?;
        &raw[..inside.len() + 2]
    } else {
        let (name, port) = match raw.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (raw, None),
        };
        check_port(port)?;
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(BadHost("it has no host name".to_owned()));
        }
        if name.len() > 253 {
            return Err(BadHost("it is longer than 253 characters".to_owned()));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(BadHost(format!("it has the character {bad:?}")));
        }
        if name.split('.').any(str::is_empty) {
            return Err(BadHost(
                "it has an empty label (two dots in a row)".to_owned(),
            ));
        }
        name
    };
    Ok(if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    })
}

fn check_port(port: Option<&str>) -> Result<(), BadHost> {
    match port {
        // "host:" has an empty port, which RFC 3986 allows.
        None | Some("") => Ok(()),
        Some(port) if port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()) => {
            match port.parse::<u32>() {
                Ok(n) if n <= 65535 => Ok(()),
                _ => Err(BadHost(format!("the port {port} is larger than 65535"))),
            }
        }
        Some(port) => Err(BadHost(format!("{port:?} is not a port number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/"));
    }

    #[test]
    fn request_hosts_are_normalized() {
        assert_eq!(
            request_host("Web.Example.NET:8080").unwrap(),
            "web.example.net"
        );
        assert_eq!(request_host("web.example.net.").unwrap(), "web.example.net");
        assert_eq!(request_host("[::1]:80").unwrap(), "[::1]");
        assert!(matches!(
            request_host("web.example.net").unwrap(),
            Cow::Borrowed(_)
        ));
        for bad in [
            "exa mple", "", ":80", "a..b", "a:b:c", "a:99999", "[::1", "[zz]", "a/b", "a@b",
        ] {
            assert!(request_host(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn route_hosts_are_strict() {
        assert!(check_route_host("web.dev.shop.example.net").is_ok());
        for bad in [
            "",
            "Web.example",
            "web.example.",
            "-a.b",
            "a_b.c",
            "a..b",
            "a b",
        ] {
            assert!(check_route_host(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
