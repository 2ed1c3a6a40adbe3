//! Routing: (host, path) → target. Exact hosts, then `*.suffix` wildcards (longest first),
//! then the catch-all `*`; within a host, the longest path prefix on a segment boundary.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::route::{HostPattern, normalize_prefix};

/// Path prefixes of one host, longest first.
#[derive(Debug, Clone)]
struct Prefixes<T>(Vec<(String, T)>);

impl<T> Default for Prefixes<T> {
    fn default() -> Self {
        Prefixes(Vec::new())
    }
}

impl<T> Prefixes<T> {
    fn insert(&mut self, prefix: String, value: T) {
        let at = self.0.partition_point(|(p, _)| p.len() >= prefix.len());
        self.0.insert(at, (prefix, value));
    }

    fn lookup(&self, path: &str) -> Option<&T> {
        self.0
            .iter()
            .find(|(prefix, _)| prefix_matches(prefix, path))
            .map(|(_, v)| v)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// An immutable routing table; rebuilt whole on reload and swapped atomically.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    exact: HashMap<String, Prefixes<T>>,
    /// Longest suffix first.
    suffixes: Vec<(String, Prefixes<T>)>,
    any: Prefixes<T>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            suffixes: Vec::new(),
            any: Prefixes::default(),
        }
    }
}

impl<T: Clone> RouteTable<T> {
    pub fn insert(&mut self, host: &HostPattern, prefix: &str, value: T) {
        let prefix = normalize_prefix(prefix);
        let prefixes = match host {
            HostPattern::Exact(h) => self.exact.entry(h.clone()).or_default(),
            HostPattern::Suffix(s) => {
                let at = match self.suffixes.iter().position(|(have, _)| have == s) {
                    Some(at) => at,
                    None => {
                        let at = self
                            .suffixes
                            .partition_point(|(have, _)| have.len() >= s.len());
                        self.suffixes.insert(at, (s.clone(), Prefixes::default()));
                        at
                    }
                };
                &mut self.suffixes[at].1
            }
            HostPattern::Any => &mut self.any,
        };
        prefixes.insert(prefix, value);
    }
}

impl<T> RouteTable<T> {
    /// `host` must already be lower-case and without its port (see [`host_of`]).
    pub fn lookup(&self, host: &str, path: &str) -> Option<&T> {
        if let Some(found) = self.exact.get(host).and_then(|p| p.lookup(path)) {
            return Some(found);
        }
        for (suffix, prefixes) in &self.suffixes {
            if host.len() > suffix.len()
                && host.ends_with(suffix.as_str())
                && let Some(found) = prefixes.lookup(path)
            {
                return Some(found);
            }
        }
        self.any.lookup(path)
    }

    pub fn len(&self) -> usize {
        self.exact.values().map(|p| p.0.len()).sum::<usize>()
            + self.suffixes.iter().map(|(_, p)| p.0.len()).sum::<usize>()
            + self.any.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host part of a `Host` header or URI authority, without port, lower-cased only when it
/// has to be (no allocation for the usual lower-case host).
pub fn host_of(authority: &str) -> std::borrow::Cow<'_, str> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: "[::1]:8080"
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// A routing table whose values are shared targets.
pub type Routes<T> = RouteTable<Arc<T>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &str, &'static str)]) -> RouteTable<&'static str> {
        let mut t = RouteTable::default();
        for (host, prefix, name) in entries {
            t.insert(&HostPattern::parse(host).unwrap(), prefix, *name);
        }
        t
    }

    #[test]
    fn exact_host_beats_wildcard_and_catch_all() {
        let t = table(&[
            ("api.example.com", "/", "exact"),
            ("*.example.com", "/", "wild"),
            ("*", "/", "any"),
        ]);
        assert_eq!(t.lookup("api.example.com", "/x"), Some(&"exact"));
        assert_eq!(t.lookup("www.example.com", "/x"), Some(&"wild"));
        assert_eq!(t.lookup("example.com", "/x"), Some(&"any"));
        assert_eq!(t.lookup("other.org", "/"), Some(&"any"));
    }

    #[test]
    fn longest_wildcard_suffix_wins() {
        let t = table(&[("*.com", "/", "com"), ("*.example.com", "/", "example")]);
        assert_eq!(t.lookup("a.example.com", "/"), Some(&"example"));
        assert_eq!(t.lookup("a.other.com", "/"), Some(&"com"));
        assert_eq!(t.lookup("com", "/"), None);
    }

    #[test]
    fn longest_prefix_on_segment_boundary() {
        let t = table(&[
            ("h", "/", "root"),
            ("h", "/api", "api"),
            ("h", "/api/v2/", "v2"),
        ]);
        assert_eq!(t.lookup("h", "/api"), Some(&"api"));
        assert_eq!(t.lookup("h", "/api/"), Some(&"api"));
        assert_eq!(t.lookup("h", "/api/users"), Some(&"api"));
        assert_eq!(t.lookup("h", "/apix"), Some(&"root"));
        assert_eq!(t.lookup("h", "/api/v2"), Some(&"v2"));
        assert_eq!(t.lookup("h", "/api/v2/x"), Some(&"v2"));
        assert_eq!(t.lookup("h", "/api/v20"), Some(&"api"));
    }

    #[test]
    fn host_without_matching_prefix_falls_through_to_wildcard() {
        let t = table(&[
            ("a.example.com", "/only", "exact"),
            ("*.example.com", "/", "wild"),
        ]);
        assert_eq!(t.lookup("a.example.com", "/only/x"), Some(&"exact"));
        assert_eq!(t.lookup("a.example.com", "/else"), Some(&"wild"));
    }

    #[test]
    fn unknown_host_has_no_route_without_catch_all() {
        let t = table(&[("a", "/", "a")]);
        assert_eq!(t.lookup("b", "/"), None);
    }

    #[test]
    fn host_of_strips_port_and_lowercases() {
        assert_eq!(host_of("Hello.Localhost:8080"), "hello.localhost");
        assert_eq!(host_of("hello.localhost"), "hello.localhost");
        assert_eq!(host_of("hello.localhost."), "hello.localhost");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
    }
}
