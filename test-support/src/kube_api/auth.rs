//! Authentication and request attributes: who is asking (bearer tokens) and what for, as the
//! real API server derives it before it authorizes a request (verb, API group, resource,
//! subresource, namespace, name).
//!
//! Two identities are known in RBAC mode: wakegate's ServiceAccount, whose token
//! [`FakeApi::write_kubeconfig`](super::FakeApi::write_kubeconfig) writes, and an admin in
//! `system:masters`, which no rule restricts. A request without a token or with an unknown one
//! gets `401 Unauthorized` with the real server's Status body. (A real server with anonymous
//! authentication on, its default, would instead take a request *without* a token as
//! `system:anonymous` and answer 403; a wrong token is 401 either way.)
//!
//! Checked against a real kube-apiserver 1.20.2: the 401 body for an unknown token is the
//! same (`{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":
//! "Unauthorized","reason":"Unauthorized","code":401}`), and so are the request attributes
//! behind its 403 messages (see `rbac`). Without a token it answered 403 as
//! `system:anonymous`, as said above.

use http::{HeaderMap, Method, header};

use super::rest::Query;

/// wakegate's ServiceAccount, `wakegate` in namespace `wakegate`, as its token authenticates.
pub const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:wakegate:wakegate";
/// The groups a ServiceAccount token carries.
pub const SERVICE_ACCOUNT_GROUPS: [&str; 3] = [
    "system:serviceaccounts",
    "system:serviceaccounts:wakegate",
    "system:authenticated",
];
/// The bearer token of wakegate's ServiceAccount in RBAC mode.
pub const SERVICE_ACCOUNT_TOKEN: &str = "fake-serviceaccount-token-wakegate-wakegate";
/// The bearer token of the admin (`system:masters`), whom RBAC does not restrict.
pub const ADMIN_TOKEN: &str = "fake-admin-token-system-masters";

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct User {
    pub(super) name: String,
    pub(super) groups: Vec<String>,
}

impl User {
    fn service_account() -> User {
        User {
            name: SERVICE_ACCOUNT_USER.to_owned(),
            groups: SERVICE_ACCOUNT_GROUPS.map(str::to_owned).to_vec(),
        }
    }

    fn admin() -> User {
        User {
            name: "admin".to_owned(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        }
    }

    /// `system:masters` bypasses authorization, as on the real server.
    pub(super) fn is_privileged(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// The user a request's `Authorization: Bearer` token names; `None`: 401.
pub(super) fn authenticate(headers: &HeaderMap) -> Option<User> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    match token.trim() {
        SERVICE_ACCOUNT_TOKEN => Some(User::service_account()),
        ADMIN_TOKEN => Some(User::admin()),
        _ => None,
    }
}

/// What a request asks for, derived from its method, path and query as the real server's
/// `RequestInfoFactory` does it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Attributes {
    /// False for a non-resource path (`/version`, `/apis`, discovery).
    pub(super) resource_request: bool,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`; for
    /// a non-resource path, the lowercase HTTP method.
    pub(super) verb: String,
    pub(super) api_group: String,
    pub(super) resource: String,
    pub(super) subresource: String,
    /// Empty at the cluster scope.
    pub(super) namespace: String,
    /// Empty for a collection, unless a field selector names one object.
    pub(super) name: String,
    pub(super) path: String,
}

impl Attributes {
    pub(super) fn of(method: &Method, path: &str, query: &Query) -> Attributes {
        let non_resource = || Attributes {
            resource_request: false,
            verb: method.as_str().to_ascii_lowercase(),
            path: path.to_owned(),
            ..Attributes::default()
        };
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (api_group, mut parts) = match parts.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return non_resource(),
        };
        if parts.is_empty() || parts == [""] {
            // `/api/v1`, `/apis/apps/v1`: discovery.
            return non_resource();
        }
        let mut verb = match *method {
            Method::POST => "create",
            Method::GET | Method::HEAD => "get",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "",
        }
        .to_owned();
        if parts[0] == "watch" {
            verb = "watch".into();
            parts = &parts[1..];
        }
        let mut namespace = "";
        if parts.first() == Some(&"namespaces") && parts.len() > 1 {
            namespace = parts[1];
            if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
                parts = &parts[2..];
            }
        }
        let resource = parts.first().copied().unwrap_or_default();
        let mut name = parts.get(1).copied().unwrap_or_default().to_owned();
        let subresource = parts.get(2).copied().unwrap_or_default();
        if name.is_empty() && verb == "get" {
            verb = if watch_flag(query) { "watch" } else { "list" }.into();
            if let Some(named) = selected_name(query) {
                name = named;
            }
        }
        if name.is_empty() && verb == "delete" {
            verb = "deletecollection".into();
        }
        Attributes {
            resource_request: true,
            verb,
            api_group: api_group.to_owned(),
            resource: resource.to_owned(),
            subresource: subresource.to_owned(),
            namespace: namespace.to_owned(),
            name,
            path: path.to_owned(),
        }
    }

    /// `deployments/scale`, or just `services`.
    pub(super) fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// `watch=...` as the real server reads a boolean query parameter: anything but `0`, `f` or
/// `false` (any case) is true.
fn watch_flag(query: &Query) -> bool {
    query.get("watch").is_some_and(|v| {
        !(v == "0" || v.eq_ignore_ascii_case("f") || v.eq_ignore_ascii_case("false"))
    })
}

/// A list or watch whose field selector requires `metadata.name=NAME` is authorized as a
/// request for that one object, like on the real server.
fn selected_name(query: &Query) -> Option<String> {
    query.get("fieldSelector")?.split(',').find_map(|term| {
        let term = term.trim();
        if term.contains("!=") {
            return None;
        }
        let (field, value) = term.split_once("==").or_else(|| term.split_once('='))?;
        let value = value.trim();
        let valid = !value.is_empty()
            && value != "."
            && value != ".."
            && !value.contains('/')
            && !value.contains('%');
        (field.trim() == "metadata.name" && valid).then(|| value.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, uri: &str) -> Attributes {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        Attributes::of(&method, path, &Query::parse(query))
    }

    #[test]
    fn verbs_resources_and_scopes_like_the_real_server() {
        let a = attrs(Method::GET, "/api/v1/services?watch=true&resourceVersion=5");
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("watch", ""));
        let a = attrs(Method::GET, "/api/v1/namespaces/demo/services");
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("list", "demo"));
        let a = attrs(
            Method::GET,
            "/apis/apps/v1/watch/namespaces/demo/deployments",
        );
        assert_eq!(
            (a.verb.as_str(), a.api_group.as_str(), a.resource.as_str()),
            ("watch", "apps", "deployments")
        );
        let a = attrs(
            Method::PATCH,
            "/apis/apps/v1/namespaces/demo/deployments/web/scale?fieldManager=x",
        );
        assert_eq!(a.verb, "patch");
        assert_eq!(a.combined_resource(), "deployments/scale");
        assert_eq!(a.name, "web");
        let a = attrs(Method::DELETE, "/api/v1/namespaces/demo/services");
        assert_eq!(a.verb, "deletecollection");
        let a = attrs(
            Method::GET,
            "/api/v1/namespaces/demo/services?fieldSelector=metadata.name%3Dweb",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("list", "web"));
        let a = attrs(Method::GET, "/api/v1/namespaces/demo");
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.namespace.as_str()),
            ("namespaces", "demo", "demo")
        );
        for path in ["/version", "/apis", "/api/v1", "/apis/apps/v1"] {
            let a = attrs(Method::GET, path);
            assert!(!a.resource_request, "{path}");
            assert_eq!(a.verb, "get");
        }
    }

    #[test]
    fn bearer_tokens() {
        let mut headers = HeaderMap::new();
        assert_eq!(authenticate(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {SERVICE_ACCOUNT_TOKEN}").parse().unwrap(),
        );
        assert_eq!(authenticate(&headers).unwrap().name, SERVICE_ACCOUNT_USER);
        headers.insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(authenticate(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            format!("bearer {ADMIN_TOKEN}").parse().unwrap(),
        );
        assert!(authenticate(&headers).unwrap().is_privileged());
    }
}
