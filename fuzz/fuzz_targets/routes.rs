//! The route table: built from arbitrary host patterns and path prefixes (those the
//! configuration accepts), then asked for arbitrary hosts and paths. Every answer must be the
//! one a plain reading of the rules gives: exact host, then the longest `*.suffix`, then `*`;
//! within a host the longest prefix on a segment boundary, the first configured on a tie.
//! Input lines: `+HOST PREFIX` adds a route, `?AUTHORITY PATH` looks one up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wakegate::config::route::{HostPattern, is_valid_prefix, normalize_prefix};
use wakegate::proxy::route::{RouteTable, host_of};

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

/// The rules read plainly, over the list of routes in the order they were added.
fn expected(routes: &[(HostPattern, String)], host: &str, path: &str) -> Option<usize> {
    // Among routes of the hosts `matches` accepts, the longest matching prefix, first on a tie.
    let best = |matches: &dyn Fn(&HostPattern) -> bool| {
        routes
            .iter()
            .enumerate()
            .filter(|(_, (h, p))| matches(h) && prefix_matches(p, path))
            .max_by_key(|(i, (_, p))| (p.len(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
    };
    if let Some(i) = best(&|h| matches!(h, HostPattern::Exact(e) if e == host)) {
        return Some(i);
    }
    let mut suffixes: Vec<&str> = routes
        .iter()
        .filter_map(|(h, _)| match h {
            HostPattern::Suffix(s) if host.len() > s.len() && host.ends_with(s.as_str()) => {
                Some(s.as_str())
            }
            _ => None,
        })
        .collect();
    suffixes.sort_by_key(|s| std::cmp::Reverse(s.len()));
    suffixes.dedup();
    for suffix in suffixes {
        if let Some(i) = best(&|h| matches!(h, HostPattern::Suffix(s) if s == suffix)) {
            return Some(i);
        }
    }
    best(&|h| matches!(h, HostPattern::Any))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut table = RouteTable::default();
    let mut routes = Vec::new();
    let mut lookups = Vec::new();
    for line in text.lines() {
        if let Some(route) = line.strip_prefix('+') {
            let (host, prefix) = route.split_once(' ').unwrap_or((route, "/"));
            if let Ok(pattern) = HostPattern::parse(host)
                && is_valid_prefix(prefix)
            {
                table.insert(&pattern, prefix, routes.len());
                routes.push((pattern, normalize_prefix(prefix)));
            }
        } else if let Some(lookup) = line.strip_prefix('?') {
            let (authority, path) = lookup.split_once(' ').unwrap_or((lookup, "/"));
            lookups.push((authority, path));
        }
    }
    assert_eq!(table.len(), routes.len());
    for (authority, path) in lookups {
        let host = host_of(authority);
        let found = table.lookup(&host, path).copied();
        assert_eq!(
            found,
            expected(&routes, &host, path),
            "lookup of {authority:?} (host {host:?}) {path:?} in {routes:?}"
        );
    }
    // Every route is found by its own host and prefix, unless an earlier one has both.
    for (i, (pattern, prefix)) in routes.iter().enumerate() {
        if let HostPattern::Exact(host) = pattern {
            let found = table.lookup(host, prefix).copied();
            assert_eq!(found, expected(&routes, host, prefix), "route {i}");
            assert!(found.is_some(), "route {i} ({host} {prefix}) is not found");
        }
    }
});
