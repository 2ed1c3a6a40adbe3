//! Where a target's traffic comes from: host patterns (exact, `*.suffix`, `*`) and path
//! prefixes, parsed once so that routing never meets an invalid one.

use std::fmt;

/// A host pattern from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`: it matches `a.example.com`, not `example.com`.
    Suffix(String),
    Any,
}

impl HostPattern {
    pub const EXPECTED: &'static str =
        "a host name, \"*.suffix\" or \"*\" (no scheme, port or path)";

    pub fn parse(text: &str) -> Result<HostPattern, &'static str> {
        let host = text.to_ascii_lowercase();
        let valid = |h: &str| {
            !h.is_empty()
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if host == "*" {
            Ok(HostPattern::Any)
        } else if let Some(rest) = host.strip_prefix("*.") {
            if valid(rest) {
                Ok(HostPattern::Suffix(format!(".{rest}")))
            } else {
                Err(Self::EXPECTED)
            }
        } else if valid(&host) {
            Ok(HostPattern::Exact(host))
        } else {
            Err(Self::EXPECTED)
        }
    }

    /// Whether this pattern matches more than one host name (`*.suffix` or `*`).
    pub fn is_wildcard(&self) -> bool {
        !matches!(self, HostPattern::Exact(_))
    }
}

/// As written in the configuration (lower-cased).
impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(host) => f.write_str(host),
            HostPattern::Suffix(suffix) => write!(f, "*{suffix}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

/// `"/api/"` and `"/api"` are the same prefix.
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Whether `prefix` can be routed on: a path starting with '/' without query, fragment or space.
pub fn is_valid_prefix(prefix: &str) -> bool {
    prefix.starts_with('/') && !prefix.contains(['?', '#', ' '])
}

/// The hosts and path prefixes that lead to one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub hosts: Vec<HostPattern>,
    /// As written; the routing table normalises them (see [`normalize_prefix`]).
    pub path_prefixes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_reject_urls_and_ports() {
        assert!(HostPattern::parse("http://a.com").is_err());
        assert!(HostPattern::parse("a.com:80").is_err());
        assert!(HostPattern::parse("*.").is_err());
        assert!(HostPattern::parse("").is_err());
        assert_eq!(
            HostPattern::parse("A.com"),
            Ok(HostPattern::Exact("a.com".into()))
        );
        assert_eq!(
            HostPattern::parse("*.a.com"),
            Ok(HostPattern::Suffix(".a.com".into()))
        );
    }

    #[test]
    fn host_patterns_print_as_written() {
        for text in ["a.com", "*.a.com", "*"] {
            assert_eq!(HostPattern::parse(text).unwrap().to_string(), text);
        }
    }
}

/// A host and path prefix a target asked for and did not get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub host: HostPattern,
    pub path_prefix: String,
    pub reason: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalReason {
    /// Another target claimed it first (`owner`: `file target NAME` or `NAMESPACE/SERVICE`).
    Claimed { owner: String },
    /// A wildcard or catch-all host from a namespace not in `kubernetes.wildcard_namespaces`.
    Wildcard,
    /// An exact host outside the namespace's `kubernetes.host_domains`.
    Domain,
    /// A `….svc` name of another namespace.
    Namespace,
}

impl RefusalReason {
    /// The `reason` label of `wakegate_refused_routes`.
    pub fn label(&self) -> &'static str {
        match self {
            RefusalReason::Claimed { .. } => "claimed",
            RefusalReason::Wildcard => "wildcard",
            RefusalReason::Domain => "domain",
            RefusalReason::Namespace => "namespace",
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::Claimed { owner } => write!(f, "already claimed by {owner}"),
            RefusalReason::Wildcard => f.write_str(
                "wildcard and catch-all hosts are allowed only from the namespaces in \
                 kubernetes.wildcard_namespaces",
            ),
            RefusalReason::Domain => {
                f.write_str("outside the namespace's domains in kubernetes.host_domains")
            }
            RefusalReason::Namespace => f.write_str("a cluster-internal name of another namespace"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}: {}", self.host, self.path_prefix, self.reason)
    }
}
