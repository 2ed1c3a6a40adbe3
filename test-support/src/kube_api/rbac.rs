//! RBAC: the ClusterRoles, Roles, ClusterRoleBindings and RoleBindings of rendered manifests,
//! evaluated like the real RBAC authorizer, and a record of which grant each request used.
//!
//! The evaluation follows Kubernetes' `rbac` authorizer: ClusterRoleBindings first, then the
//! RoleBindings of the request's namespace; a binding applies to a User by name, a Group by
//! the user's groups, a ServiceAccount by `system:serviceaccount:NS:NAME`; a rule matches on
//! verb, API group, resource (`deployments/scale` for a subresource, `*`, `*/scale`) and
//! `resourceNames` (which never match a request without a name, such as a list). A binding
//! to a missing role denies with the real server's reason (`RBAC: role.rbac.authorization.k8s.io
//! "x" not found`). Every authenticated user also gets the bootstrap discovery paths
//! (`/version`, `/api`, `/apis`, ...), which are not reported.
//!
//! Checked against a real kube-apiserver 1.20.2 (RBAC mode, deploy/base's RBAC objects
//! applied, the ServiceAccount's TokenRequest token): the 403 bodies (message, `reason`,
//! `details` name/group/kind, `code`) and the `X-Content-Type-Options: nosniff` header
//! matched exactly for list and watch at the cluster scope and in a namespace (`?watch=true`
//! and `/watch/` paths), get and delete of a Service, a patch of the Deployment itself, a PUT
//! of `deployments/scale` (`deployments.apps "web" is forbidden: ... cannot update resource
//! "deployments/scale" ...`, details kind `deployments`), a Lease created in another
//! namespace (no name yet), a list narrowed by `fieldSelector=metadata.name=x` (named `"x"`),
//! a deletecollection, `GET /api/v1/namespaces/demo` (namespace = name), a non-resource
//! `POST /metrics` (`forbidden: ... cannot post path "/metrics"`, empty details), and the
//! reasons of bindings to missing roles (one: `RBAC: clusterrole... "x" not found`; several:
//! `RBAC: [a, b]`, ClusterRoleBindings first). There too, the ServiceAccount was allowed
//! exactly deploy/base's grants (each checked with `kubectl auth can-i`, several by request),
//! and not `update` on `deployments/scale` nor Leases outside `wakegate`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use serde_json::Value;

use super::auth::{Attributes, SERVICE_ACCOUNT_GROUPS, SERVICE_ACCOUNT_USER, User};

/// The RBAC objects a [`FakeApi`](super::FakeApi) enforces, from rendered manifests.
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    roles: Vec<Role>,
    bindings: Vec<Binding>,
}

#[derive(Clone, Debug)]
struct Role {
    cluster: bool,
    namespace: String,
    name: String,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default)]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    resource_names: Vec<String>,
    non_resource_urls: Vec<String>,
}

#[derive(Clone, Debug)]
struct Binding {
    cluster: bool,
    namespace: String,
    name: String,
    role_cluster: bool,
    role_name: String,
    subjects: Vec<Subject>,
}

#[derive(Clone, Debug)]
struct Subject {
    kind: String,
    name: String,
    namespace: String,
}

/// One verb on one resource that a rule grants through one binding, spelt as in the rule
/// (`*` stays `*`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    pub verb: String,
    pub api_group: String,
    /// `services`, `deployments/scale` for a subresource, or a rule's non-resource URL.
    pub resource: String,
    /// The rule's `resourceNames`; empty: any object.
    pub resource_names: Vec<String>,
    /// Where the grant applies: `None` cluster-wide (a ClusterRoleBinding), else the
    /// RoleBinding's namespace.
    pub namespace: Option<String>,
    /// `ClusterRole wakegate` or `Role wakegate/wakegate-leader-election`.
    pub role: String,
    /// `ClusterRoleBinding wakegate` or `RoleBinding wakegate/wakegate-leader-election`.
    pub binding: String,
}

/// Requests that one grant allowed, by (verb, group, resource, scope).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use {
    pub verb: String,
    pub api_group: String,
    /// `services`, `deployments/scale` for a subresource, or a non-resource path.
    pub resource: String,
    /// The request's namespace; `None` at the cluster scope (e.g. a list of all Services).
    pub namespace: Option<String>,
    pub granted_by: Grant,
    /// How many requests.
    pub requests: usize,
}

/// A request RBAC refused (403), in the order they came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub user: String,
    pub verb: String,
    pub api_group: String,
    /// `services`, or `deployments/scale` for a subresource; for a non-resource request, the
    /// path.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The 403's message, as the client saw it.
    pub message: String,
}

/// What RBAC did so far: see [`FakeApi::rbac_report`](super::FakeApi::rbac_report).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RbacReport {
    /// Each (verb, group, resource, scope) used, with the grant that allowed it.
    pub used: Vec<Use>,
    /// Every request denied.
    pub denied: Vec<Denied>,
    /// The grants to wakegate's ServiceAccount that no request used.
    pub unused: Vec<Grant>,
}

fn scope(namespace: Option<&str>) -> String {
    match namespace {
        Some(namespace) => format!("in namespace {namespace:?}"),
        None => "cluster-wide".to_owned(),
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} in API group {:?}",
            self.verb, self.resource, self.api_group
        )?;
        if !self.resource_names.is_empty() {
            write!(f, " named {:?}", self.resource_names)?;
        }
        write!(
            f,
            " {} ({} via {})",
            scope(self.namespace.as_deref()),
            self.role,
            self.binding
        )
    }
}

impl fmt::Display for Use {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} in API group {:?} {}: {} request(s), granted by {} via {}",
            self.verb,
            self.resource,
            self.api_group,
            scope(self.namespace.as_deref()),
            self.requests,
            self.granted_by.role,
            self.granted_by.binding
        )
    }
}

impl fmt::Display for RbacReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "used ({}):", self.used.len())?;
        for used in &self.used {
            writeln!(f, "  {used}")?;
        }
        writeln!(f, "denied ({}):", self.denied.len())?;
        for denied in &self.denied {
            writeln!(f, "  {}", denied.message)?;
        }
        writeln!(f, "granted, never used ({}):", self.unused.len())?;
        for grant in &self.unused {
            writeln!(f, "  {grant}")?;
        }
        Ok(())
    }
}

/// Where a request's permission came from.
pub(super) enum Decision {
    /// A rule of a manifest; `Grant` is what the report counts.
    Allowed(Grant),
    /// The built-in discovery rules every authenticated user has.
    Bootstrap,
    /// Denied, with the authorizer's reason (empty, or `RBAC: ... not found`).
    Denied(String),
}

/// Non-resource URLs that the bootstrap roles `system:discovery` and
/// `system:public-info-viewer` let every authenticated user `get`.
const BOOTSTRAP_PATHS: [&str; 11] = [
    "/api",
    "/api/*",
    "/apis",
    "/apis/*",
    "/healthz",
    "/livez",
    "/openapi",
    "/openapi/*",
    "/readyz",
    "/version",
    "/version/",
];

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn namespace_of(object: &Value) -> String {
    object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned()
}

impl Rbac {
    /// The RBAC objects among `objects` (rendered manifests, as JSON values): ClusterRoles,
    /// Roles, ClusterRoleBindings and RoleBindings of `rbac.authorization.k8s.io/v1`; other
    /// kinds are ignored. A namespaced object without a namespace is in `default`, as
    /// `kubectl apply` would put it.
    pub fn from_manifests(objects: &[Value]) -> Rbac {
        let mut rbac = Rbac::default();
        for object in objects {
            if object["apiVersion"] != "rbac.authorization.k8s.io/v1" {
                continue;
            }
            let kind = object["kind"].as_str().unwrap_or_default();
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match kind {
                "ClusterRole" | "Role" => {
                    let cluster = kind == "ClusterRole";
                    let rules = object["rules"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|rule| Rule {
                            api_groups: strings(&rule["apiGroups"]),
                            resources: strings(&rule["resources"]),
                            verbs: strings(&rule["verbs"]),
                            resource_names: strings(&rule["resourceNames"]),
                            non_resource_urls: strings(&rule["nonResourceURLs"]),
                        })
                        .collect();
                    rbac.roles.push(Role {
                        cluster,
                        namespace: if cluster {
                            String::new()
                        } else {
                            namespace_of(object)
                        },
                        name,
                        rules,
                    });
                }
                "ClusterRoleBinding" | "RoleBinding" => {
                    let cluster = kind == "ClusterRoleBinding";
                    let subjects = object["subjects"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|s| Subject {
                            kind: s["kind"].as_str().unwrap_or_default().to_owned(),
                            name: s["name"].as_str().unwrap_or_default().to_owned(),
                            namespace: s["namespace"].as_str().unwrap_or_default().to_owned(),
                        })
                        .collect();
                    rbac.bindings.push(Binding {
                        cluster,
                        namespace: if cluster {
                            String::new()
                        } else {
                            namespace_of(object)
                        },
                        name,
                        role_cluster: object["roleRef"]["kind"] == "ClusterRole",
                        role_name: object["roleRef"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        subjects,
                    });
                }
                _ => {}
            }
        }
        rbac
    }

    /// The RBAC objects of a kustomization of this repository, `dir` being relative to its
    /// root (e.g. `"deploy/base"`), rendered by `kubectl kustomize` once per process.
    pub fn from_deploy(dir: &str) -> Rbac {
        Rbac::from_manifests(&rendered(dir))
    }

    fn role(&self, binding: &Binding) -> Option<&Role> {
        self.roles.iter().find(|role| {
            role.name == binding.role_name
                && role.cluster == binding.role_cluster
                && (role.cluster || role.namespace == binding.namespace)
        })
    }

    /// The bindings that apply to `user` for a request in `namespace` (empty: cluster scope),
    /// ClusterRoleBindings first, as the real authorizer visits them.
    fn bindings_for<'a>(
        &'a self,
        user: &'a User,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Binding> + 'a {
        let cluster = self.bindings.iter().filter(|b| b.cluster);
        let local = self
            .bindings
            .iter()
            .filter(move |b| !b.cluster && !namespace.is_empty() && b.namespace == namespace);
        cluster
            .chain(local)
            .filter(move |b| b.subjects.iter().any(|s| applies_to(s, user, &b.namespace)))
    }

    pub(super) fn authorize(&self, user: &User, attrs: &Attributes) -> Decision {
        if !attrs.resource_request
            && attrs.verb == "get"
            && BOOTSTRAP_PATHS
                .iter()
                .any(|url| url_matches(url, &attrs.path))
        {
            return Decision::Bootstrap;
        }
        let mut errors = Vec::new();
        for binding in self.bindings_for(user, &attrs.namespace) {
            let Some(role) = self.role(binding) else {
                let kind = if binding.role_cluster {
                    "clusterrole"
                } else {
                    "role"
                };
                errors.push(format!(
                    "{kind}.rbac.authorization.k8s.io {:?} not found",
                    binding.role_name
                ));
                continue;
            };
            for rule in &role.rules {
                if let Some(grant) = rule_allows(rule, attrs) {
                    return Decision::Allowed(grant.into_grant(role, binding));
                }
            }
        }
        Decision::Denied(match errors.len() {
            0 => String::new(),
            1 => format!("RBAC: {}", errors[0]),
            _ => format!("RBAC: [{}]", errors.join(", ")),
        })
    }

    /// Every grant to wakegate's ServiceAccount, one per (binding, rule, verb, group,
    /// resource).
    pub(super) fn service_account_grants(&self) -> Vec<Grant> {
        let user = User {
            name: SERVICE_ACCOUNT_USER.to_owned(),
            groups: SERVICE_ACCOUNT_GROUPS.map(str::to_owned).to_vec(),
        };
        let mut grants = Vec::new();
        for binding in &self.bindings {
            if !binding
                .subjects
                .iter()
                .any(|s| applies_to(s, &user, &binding.namespace))
            {
                continue;
            }
            let Some(role) = self.role(binding) else {
                continue;
            };
            for rule in &role.rules {
                for verb in &rule.verbs {
                    for url in &rule.non_resource_urls {
                        let grant = Matched {
                            verb,
                            api_group: "",
                            resource: url,
                            resource_names: &[],
                        }
                        .into_grant(role, binding);
                        if !grants.contains(&grant) {
                            grants.push(grant);
                        }
                    }
                    for group in &rule.api_groups {
                        for resource in &rule.resources {
                            let grant = Matched {
                                verb,
                                api_group: group,
                                resource,
                                resource_names: &rule.resource_names,
                            }
                            .into_grant(role, binding);
                            if !grants.contains(&grant) {
                                grants.push(grant);
                            }
                        }
                    }
                }
            }
        }
        grants
    }
}

/// `appliesToUser` of the real authorizer; `namespace` is the binding's (empty for a
/// ClusterRoleBinding), which a ServiceAccount subject without one defaults to.
fn applies_to(subject: &Subject, user: &User, namespace: &str) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.groups.contains(&subject.name),
        "ServiceAccount" => {
            let sa_namespace = if subject.namespace.is_empty() {
                namespace
            } else {
                &subject.namespace
            };
            !sa_namespace.is_empty()
                && user.name == format!("system:serviceaccount:{sa_namespace}:{}", subject.name)
        }
        _ => false,
    }
}

/// The entries of a rule that matched a request.
struct Matched<'a> {
    verb: &'a str,
    api_group: &'a str,
    resource: &'a str,
    resource_names: &'a [String],
}

impl Matched<'_> {
    fn into_grant(self, role: &Role, binding: &Binding) -> Grant {
        Grant {
            verb: self.verb.to_owned(),
            api_group: self.api_group.to_owned(),
            resource: self.resource.to_owned(),
            resource_names: self.resource_names.to_vec(),
            namespace: (!binding.cluster).then(|| binding.namespace.clone()),
            role: if role.cluster {
                format!("ClusterRole {}", role.name)
            } else {
                format!("Role {}/{}", role.namespace, role.name)
            },
            binding: if binding.cluster {
                format!("ClusterRoleBinding {}", binding.name)
            } else {
                format!("RoleBinding {}/{}", binding.namespace, binding.name)
            },
        }
    }
}

/// `RuleAllows` of the real authorizer; the entries that matched.
fn rule_allows<'a>(rule: &'a Rule, attrs: &Attributes) -> Option<Matched<'a>> {
    let verb = rule.verbs.iter().find(|v| *v == "*" || **v == attrs.verb)?;
    if !attrs.resource_request {
        let url = rule
            .non_resource_urls
            .iter()
            .find(|url| url_matches(url, &attrs.path))?;
        return Some(Matched {
            verb,
            api_group: "",
            resource: url,
            resource_names: &[],
        });
    }
    let api_group = rule
        .api_groups
        .iter()
        .find(|g| *g == "*" || **g == attrs.api_group)?;
    let combined = attrs.combined_resource();
    let resource = rule.resources.iter().find(|r| {
        *r == "*"
            || **r == combined
            || (!attrs.subresource.is_empty()
                && r.strip_prefix("*/") == Some(attrs.subresource.as_str()))
    })?;
    if !rule.resource_names.is_empty() && !rule.resource_names.contains(&attrs.name) {
        return None;
    }
    Some(Matched {
        verb,
        api_group,
        resource,
        resource_names: &rule.resource_names,
    })
}

/// `NonResourceURLMatches`: exact, or a prefix ending in `*`.
fn url_matches(url: &str, path: &str) -> bool {
    url == "*"
        || url == path
        || url
            .strip_suffix('*')
            .is_some_and(|prefix| path.starts_with(prefix))
}

/// The 403 message of the real server: `services is forbidden: User "..." cannot list
/// resource "services" in API group "" in the namespace "demo"`, with the authorizer's reason
/// appended when it gave one.
pub(super) fn forbidden_message(user: &User, attrs: &Attributes, reason: &str) -> String {
    let mut message = if attrs.resource_request {
        let scope = if attrs.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace {:?}", attrs.namespace)
        };
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} {scope}",
            user.name,
            attrs.verb,
            attrs.combined_resource(),
            attrs.api_group
        )
    } else {
        format!(
            "User {:?} cannot {} path {:?}",
            user.name, attrs.verb, attrs.path
        )
    };
    // The real server escapes what could pass for HTML.
    message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    if !reason.is_empty() {
        message = format!("{message}: {reason}");
    }
    let qualified = match (attrs.resource.as_str(), attrs.api_group.as_str()) {
        ("", _) => String::new(),
        (resource, "") => resource.to_owned(),
        (resource, group) => format!("{resource}.{group}"),
    };
    match (qualified.is_empty(), attrs.name.is_empty()) {
        (true, _) => format!("forbidden: {message}"),
        (false, true) => format!("{qualified} is forbidden: {message}"),
        (false, false) => format!("{qualified} {:?} is forbidden: {message}", attrs.name),
    }
}

/// Which grants requests used, and what was denied, since RBAC mode began.
#[derive(Default)]
pub(super) struct Usage {
    /// (verb, group, combined resource, namespace, grant) → requests.
    used: BTreeMap<(String, String, String, Option<String>, Grant), usize>,
    denied: Vec<Denied>,
}

impl Usage {
    pub(super) fn allowed(&mut self, attrs: &Attributes, grant: Grant) {
        let key = (
            attrs.verb.clone(),
            attrs.api_group.clone(),
            if attrs.resource_request {
                attrs.combined_resource()
            } else {
                attrs.path.clone()
            },
            (!attrs.namespace.is_empty()).then(|| attrs.namespace.clone()),
            grant,
        );
        *self.used.entry(key).or_default() += 1;
    }

    pub(super) fn denied(&mut self, user: &User, attrs: &Attributes, message: &str) {
        self.denied.push(Denied {
            user: user.name.clone(),
            verb: attrs.verb.clone(),
            api_group: attrs.api_group.clone(),
            resource: if attrs.resource_request {
                attrs.combined_resource()
            } else {
                attrs.path.clone()
            },
            namespace: (!attrs.namespace.is_empty()).then(|| attrs.namespace.clone()),
            name: (!attrs.name.is_empty()).then(|| attrs.name.clone()),
            message: message.to_owned(),
        });
    }

    pub(super) fn report(&self, rbac: &Rbac) -> RbacReport {
        let used: Vec<Use> = self
            .used
            .iter()
            .map(
                |((verb, group, resource, namespace, grant), &requests)| Use {
                    verb: verb.clone(),
                    api_group: group.clone(),
                    resource: resource.clone(),
                    namespace: namespace.clone(),
                    granted_by: grant.clone(),
                    requests,
                },
            )
            .collect();
        let unused = rbac
            .service_account_grants()
            .into_iter()
            .filter(|grant| !used.iter().any(|u| u.granted_by == *grant))
            .collect();
        RbacReport {
            used,
            denied: self.denied.clone(),
            unused,
        }
    }
}

/// The repository's root: test-support's parent directory.
fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support is inside the repository")
        .to_owned()
}

/// `kubectl kustomize ROOT/dir`, parsed; rendered once per process and directory.
pub fn rendered(dir: &str) -> Vec<Value> {
    static RENDERED: OnceLock<Mutex<HashMap<String, Vec<Value>>>> = OnceLock::new();
    let cache = RENDERED.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(dir.to_owned())
        .or_insert_with(|| render(&repository_root().join(dir)))
        .clone()
}

fn render(dir: &Path) -> Vec<Value> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize {}` (RBAC mode renders the manifests with \
                 kubectl 1.21 or later on PATH): {e}",
                dir.display()
            )
        });
    assert!(
        output.status.success(),
        "`kubectl kustomize {}` failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kubectl prints UTF-8");
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: kubectl printed invalid YAML: {e}", dir.display()))
        })
        .filter(|object| !object.is_null())
        .collect()
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::super::rest::Query;
    use super::*;

    fn sa() -> User {
        User {
            name: SERVICE_ACCOUNT_USER.to_owned(),
            groups: SERVICE_ACCOUNT_GROUPS.map(str::to_owned).to_vec(),
        }
    }

    fn attrs(method: Method, uri: &str) -> Attributes {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        Attributes::of(&method, path, &Query::parse(query))
    }

    fn manifests() -> Vec<Value> {
        vec![
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "c"},
            "rules": [
                {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]},
                {"apiGroups": ["apps"], "resources": ["*/scale"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
                 "resourceNames": ["mine"]},
            ]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "c"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "c"},
                "subjects": [{"kind": "ServiceAccount", "name": "wakegate", "namespace": "wakegate"}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "missing", "namespace": "wakegate"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gone"},
                "subjects": [{"kind": "Group", "name": "system:serviceaccounts"}]}),
        ]
    }

    #[test]
    fn rules_match_like_the_real_authorizer() {
        let rbac = Rbac::from_manifests(&manifests());
        let user = sa();
        let allowed = |uri: &str, method: Method| {
            matches!(
                rbac.authorize(&user, &attrs(method, uri)),
                Decision::Allowed(_)
            )
        };
        assert!(allowed("/api/v1/services?watch=1", Method::GET));
        assert!(allowed("/api/v1/namespaces/x/services", Method::GET));
        assert!(!allowed("/api/v1/namespaces/x/services/a", Method::GET));
        assert!(allowed(
            "/apis/apps/v1/namespaces/x/deployments/a/scale",
            Method::GET
        ));
        assert!(!allowed(
            "/apis/apps/v1/namespaces/x/deployments/a",
            Method::GET
        ));
        assert!(allowed("/api/v1/namespaces/x/configmaps/mine", Method::GET));
        assert!(!allowed(
            "/api/v1/namespaces/x/configmaps/other",
            Method::GET
        ));
        assert!(!allowed("/api/v1/namespaces/x/configmaps", Method::GET));
        assert!(matches!(
            rbac.authorize(&user, &attrs(Method::GET, "/version")),
            Decision::Bootstrap
        ));
        // The binding to a missing Role is the reason, in its namespace only.
        let in_wakegate = attrs(Method::GET, "/api/v1/namespaces/wakegate/pods");
        let Decision::Denied(reason) = rbac.authorize(&user, &in_wakegate) else {
            panic!("allowed")
        };
        assert_eq!(
            reason,
            "RBAC: role.rbac.authorization.k8s.io \"gone\" not found"
        );
        let Decision::Denied(reason) = rbac.authorize(&user, &attrs(Method::GET, "/api/v1/pods"))
        else {
            panic!("allowed")
        };
        assert_eq!(reason, "");
    }

    #[test]
    fn forbidden_messages() {
        let user = sa();
        let cases = [
            (
                Method::GET,
                "/api/v1/namespaces/demo/services",
                "services is forbidden: User \"system:serviceaccount:wakegate:wakegate\" \
                 cannot list resource \"services\" in API group \"\" in the namespace \"demo\"",
            ),
            (
                Method::GET,
                "/api/v1/pods?watch=true",
                "pods is forbidden: User \"system:serviceaccount:wakegate:wakegate\" \
                 cannot watch resource \"pods\" in API group \"\" at the cluster scope",
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/demo/deployments/x/scale",
                "deployments.apps \"x\" is forbidden: User \
                 \"system:serviceaccount:wakegate:wakegate\" cannot patch resource \
                 \"deployments/scale\" in API group \"apps\" in the namespace \"demo\"",
            ),
            (
                Method::POST,
                "/metrics",
                "forbidden: User \"system:serviceaccount:wakegate:wakegate\" cannot post \
                 path \"/metrics\"",
            ),
        ];
        for (method, uri, message) in cases {
            assert_eq!(forbidden_message(&user, &attrs(method, uri), ""), message);
        }
    }

    #[test]
    fn grants_of_the_service_account() {
        let rbac = Rbac::from_manifests(&manifests());
        let grants: Vec<String> = rbac
            .service_account_grants()
            .iter()
            .map(|g| format!("{} {} {}", g.verb, g.api_group, g.resource))
            .collect();
        assert_eq!(
            grants,
            [
                "list  services",
                "watch  services",
                "get apps */scale",
                "get  configmaps"
            ]
        );
    }
}
