//! Who routes a host and path prefix when several targets ask for it. File targets come first,
//! in file order; then discovered Services in the order the provider gives them (oldest
//! first, then by namespace and name), so the first to claim a route keeps it whatever the
//! order of reloads and events. A Service may also be refused a host by the operator's policy
//! (`[kubernetes]`: wildcard namespaces, domains per namespace), whoever holds it.

use std::collections::HashMap;
use std::fmt;

use crate::config::KubernetesConfig;
use crate::config::route::{HostPattern, Refusal, RefusalReason, Route, normalize_prefix};

/// Where a claim comes from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    File { name: &'a str },
    Service { namespace: &'a str, name: &'a str },
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { name } => write!(f, "file target {name}"),
            Origin::Service { namespace, name } => write!(f, "Service {namespace}/{name}"),
        }
    }
}

/// What one claimant gets.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// (host, normalised path prefix) pairs it routes.
    pub granted: Vec<(HostPattern, String)>,
    pub refused: Vec<Refusal>,
}

/// Resolves every claim, in priority order; one outcome per claimant, in the same order.
pub fn resolve<'a>(
    claimants: impl IntoIterator<Item = (Origin<'a>, &'a Route)>,
    policy: Option<&KubernetesConfig>,
) -> Vec<Outcome> {
    let mut owners: HashMap<(HostPattern, String), String> = HashMap::new();
    let mut outcomes = Vec::new();
    for (origin, route) in claimants {
        let mut outcome = Outcome::default();
        for host in &route.hosts {
            let allowed = match (origin, policy) {
                (Origin::Service { namespace, .. }, Some(policy)) => {
                    policy.may_claim(namespace, host)
                }
                (Origin::Service { .. }, None) | (Origin::File { .. }, _) => Ok(()),
            };
            for prefix in &route.path_prefixes {
                let prefix = normalize_prefix(prefix);
                let reason = match &allowed {
                    Err(reason) => Some(reason.clone()),
                    Ok(()) => match owners.get(&(host.clone(), prefix.clone())) {
                        Some(owner) if *owner != origin.to_string() => {
                            Some(RefusalReason::Claimed {
                                owner: owner.clone(),
                            })
                        }
                        // The same claimant twice (a host listed twice) is no conflict.
                        Some(_) => continue,
                        None => None,
                    },
                };
                match reason {
                    Some(reason) => outcome.refused.push(Refusal {
                        host: host.clone(),
                        path_prefix: prefix,
                        reason,
                    }),
                    None => {
                        owners.insert((host.clone(), prefix.clone()), origin.to_string());
                        outcome.granted.push((host.clone(), prefix));
                    }
                }
            }
        }
        outcomes.push(outcome);
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn route(hosts: &[&str], prefixes: &[&str]) -> Route {
        Route {
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            path_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn policy(wildcards: &[&str], domains: &[(&str, &[&str])]) -> KubernetesConfig {
        let mut config: KubernetesConfig = toml::from_str("").unwrap();
        config.wildcard_namespaces = wildcards.iter().map(|n| n.to_string()).collect();
        config.host_domains = domains
            .iter()
            .map(|(ns, d)| (ns.to_string(), d.iter().map(|d| d.to_string()).collect()))
            .collect::<BTreeMap<_, _>>();
        config
    }

    fn svc<'a>(namespace: &'a str, name: &'a str) -> Origin<'a> {
        Origin::Service { namespace, name }
    }

    fn summary(outcomes: &[Outcome]) -> Vec<(Vec<String>, Vec<String>)> {
        outcomes
            .iter()
            .map(|o| {
                (
                    o.granted.iter().map(|(h, p)| format!("{h}{p}")).collect(),
                    o.refused.iter().map(|r| r.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn the_first_claimant_keeps_a_host_and_prefix_and_later_ones_are_refused_it() {
        let a = route(&["shop.example.com"], &["/"]);
        let b = route(&["shop.example.com", "b.example.com"], &["/", "/api"]);
        let outcomes = resolve(
            [(svc("team-a", "shop"), &a), (svc("team-b", "x"), &b)],
            None,
        );
        assert_eq!(
            summary(&outcomes),
            [
                (vec!["shop.example.com/".into()], vec![]),
                (
                    vec![
                        "shop.example.com/api".into(),
                        "b.example.com/".into(),
                        "b.example.com/api".into()
                    ],
                    vec!["shop.example.com/: already claimed by Service team-a/shop".into()]
                ),
            ]
        );
    }

    #[test]
    fn a_file_target_keeps_its_routes_against_any_service() {
        let file = route(&["*"], &["/"]);
        let service = route(&["*"], &["/"]);
        let outcomes = resolve(
            [
                (Origin::File { name: "web" }, &file),
                (svc("ingress", "all"), &service),
            ],
            Some(&policy(&["ingress"], &[])),
        );
        assert_eq!(outcomes[0].granted.len(), 1);
        assert_eq!(
            outcomes[1].refused[0].reason,
            RefusalReason::Claimed {
                owner: "file target web".into()
            }
        );
    }

    #[test]
    fn wildcards_only_from_listed_namespaces_and_exact_hosts_only_inside_the_domains() {
        let wild = route(&["*.example.com", "*"], &["/"]);
        let exact = route(&["a.team-a.example.com", "shop.example.com"], &["/"]);
        let internal = route(&["web.team-b.svc", "web.team-a.svc.cluster.local"], &["/"]);
        let config = policy(&["edge"], &[("team-a", &["team-a.example.com"])]);
        let outcomes = resolve(
            [
                (svc("team-a", "wild"), &wild),
                (svc("edge", "wild"), &wild),
                (svc("team-a", "exact"), &exact),
                (svc("team-b", "exact"), &exact),
                (svc("team-a", "internal"), &internal),
            ],
            Some(&config),
        );
        let reasons: Vec<Vec<&str>> = outcomes
            .iter()
            .map(|o| o.refused.iter().map(|r| r.reason.label()).collect())
            .collect();
        assert_eq!(
            reasons,
            [
                vec!["wildcard", "wildcard"],
                vec![],
                vec!["domain"],
                // Not limited to domains, but team-a already holds the first host.
                vec!["claimed"],
                vec!["namespace"],
            ]
        );
        assert_eq!(
            summary(&outcomes[3..4])[0].0,
            ["shop.example.com/"],
            "team-a was refused shop.example.com, so team-b may have it"
        );
    }

    #[test]
    fn without_a_kubernetes_section_services_are_only_limited_by_earlier_claims() {
        let wild = route(&["*"], &["/"]);
        let outcomes = resolve([(svc("any", "wild"), &wild)], None);
        assert!(outcomes[0].refused.is_empty());
    }
}
