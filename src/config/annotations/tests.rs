use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

fn service(annotations: &[(&str, &str)], ports: &[(&str, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some("hello".into()),
            namespace: Some("demo".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| ServicePort {
                        name: (!name.is_empty()).then(|| name.to_string()),
                        port: *port,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn hosts(t: &TargetConfig) -> Vec<String> {
    t.route.hosts.iter().map(ToString::to_string).collect()
}

fn kube(t: &TargetConfig) -> &KubeTarget {
    match &t.backend {
        Backend::Kubernetes(k) => k,
        other => panic!("expected a Kubernetes backend, got {other:?}"),
    }
}

fn target(outcome: Outcome) -> (TargetConfig, Vec<Problem>) {
    match outcome {
        Outcome::Target(t, problems) => (*t, problems),
        other => panic!("expected a target, got {other:?}"),
    }
}

#[test]
fn services_without_the_opt_in_are_ignored() {
    assert_eq!(
        from_service(&service(&[], &[("http", 80)])),
        Outcome::NotEnabled
    );
    assert_eq!(
        from_service(&service(&[("enabled", "false")], &[("http", 80)])),
        Outcome::NotEnabled
    );
}

#[test]
fn an_opted_in_service_gets_every_default() {
    let (t, problems) = target(from_service(&service(
        &[("enabled", "true")],
        &[("http", 80), ("metrics", 9090)],
    )));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!((t.namespace.as_str(), t.name.as_str()), ("demo", "hello"));
    assert_eq!(
        hosts(&t),
        [
            "hello.demo",
            "hello.demo.svc",
            "hello.demo.svc.cluster.local"
        ]
    );
    assert_eq!(t.route.path_prefixes, ["/"]);
    let k = kube(&t);
    assert_eq!(
        (k.workload.name.as_str(), k.port_name.as_str()),
        ("hello", "http"),
        "first port"
    );
    assert_eq!((t.scaling.min, t.scaling.max), (0, 10));
    assert_eq!(t.scaling.metric, Metric::Concurrency);
    assert_eq!(t.scaling.target_value(), 10.0);
    assert_eq!(t.scaling.scale_down_delay, Duration::from_secs(30));
    assert_eq!(t.serving.idle_timeout, Duration::from_secs(300));
    assert_eq!(
        t.serving.stream_idle_timeout,
        Duration::from_secs(300),
        "the idle timeout's"
    );
    assert_eq!(t.serving.cold_start_timeout, Duration::from_secs(60));
    assert_eq!(t.serving.max_pending, 1000);
    assert_eq!(t.serving.instance_concurrency, 0, "no limit");
    assert!(!t.serving.wake_page);
}

#[test]
fn every_annotation_is_read() {
    let (t, problems) = target(from_service(&service(
        &[
            ("enabled", "true"),
            ("deployment", "hello-v2"),
            ("hosts", "hello.example.com, *.hello.example.com"),
            ("path-prefixes", "/api,/v2"),
            ("port", "9090"),
            ("min-replicas", "1"),
            ("max-replicas", "5"),
            ("metric", "rps"),
            ("target", "25"),
            ("scale-down-delay", "1m"),
            ("idle-timeout", "10m"),
            ("stream-idle-timeout", "90s"),
            ("cold-start-timeout", "2m"),
            ("max-pending", "50"),
            ("max-pending-bytes", "16MiB"),
            ("instance-concurrency", "4"),
            ("wake-page", "true"),
        ],
        &[("http", 80), ("metrics", 9090)],
    )));
    assert!(problems.is_empty(), "{problems:?}");
    let k = kube(&t);
    assert_eq!(
        (k.workload.name.as_str(), k.port_name.as_str()),
        ("hello-v2", "metrics")
    );
    assert_eq!(hosts(&t), ["hello.example.com", "*.hello.example.com"]);
    assert_eq!(t.route.path_prefixes, ["/api", "/v2"]);
    assert_eq!((t.scaling.min, t.scaling.max), (1, 5));
    assert_eq!(t.scaling.metric, Metric::Rps);
    assert_eq!(t.scaling.target_value(), 25.0);
    assert_eq!(t.scaling.scale_down_delay, Duration::from_secs(60));
    assert_eq!(t.serving.idle_timeout, Duration::from_secs(600));
    assert_eq!(t.serving.stream_idle_timeout, Duration::from_secs(90));
    assert_eq!(t.serving.cold_start_timeout, Duration::from_secs(120));
    assert_eq!(t.serving.max_pending, 50);
    assert_eq!(t.serving.max_pending_bytes, 16 << 20);
    assert_eq!(t.serving.instance_concurrency, 4);
    assert!(t.serving.wake_page);
}

#[test]
fn a_bad_tuning_value_uses_its_default_and_says_so() {
    let (t, problems) = target(from_service(&service(
        &[
            ("enabled", "true"),
            ("max-replicas", "ten"),
            ("idle-timeout", "soon"),
            ("stream-idle-timeout", "0s"),
            ("metric", "cpu"),
            ("max-pending-bytes", "16M"),
            ("typo", "1"),
        ],
        &[("http", 80)],
    )));
    assert_eq!(t.scaling.max, 10);
    assert_eq!(t.serving.max_pending_bytes, 64 << 20);
    assert_eq!(t.serving.idle_timeout, Duration::from_secs(300));
    assert_eq!(t.serving.stream_idle_timeout, Duration::from_secs(300));
    assert_eq!(t.scaling.metric, Metric::Concurrency);
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    for field in [
        "wakegate.io/max-replicas",
        "wakegate.io/idle-timeout",
        "wakegate.io/stream-idle-timeout",
        "wakegate.io/metric",
        "wakegate.io/max-pending-bytes",
        "wakegate.io/typo",
    ] {
        assert!(fields.contains(&field), "{field} in {fields:?}");
    }
    let max = problems
        .iter()
        .find(|p| p.field == "wakegate.io/max-replicas")
        .unwrap();
    assert_eq!(max.value, "\"ten\"");
    assert!(
        max.expected.contains("whole number") && max.expected.contains("using 10"),
        "{max}"
    );
    let bytes = problems
        .iter()
        .find(|p| p.field == "wakegate.io/max-pending-bytes")
        .unwrap();
    assert!(bytes.expected.ends_with("using 64 MiB"), "{bytes}");
}

#[test]
fn min_above_max_falls_back_to_both_defaults() {
    let (t, problems) = target(from_service(&service(
        &[
            ("enabled", "true"),
            ("min-replicas", "5"),
            ("max-replicas", "2"),
        ],
        &[("http", 80)],
    )));
    assert_eq!((t.scaling.min, t.scaling.max), (0, 10));
    assert_eq!(problems.len(), 1);
}

#[test]
fn a_bad_route_skips_the_service() {
    for (key, value) in [
        ("hosts", "http://x.com"),
        ("path-prefixes", "api"),
        ("port", "grpc"),
        ("deployment", "Bad_Name"),
        ("workload", "daemonset/web"),
        ("workload", "statefulset"),
        ("workload", "rollout.v1alpha1/web"),
    ] {
        match from_service(&service(
            &[("enabled", "true"), (key, value)],
            &[("http", 80)],
        )) {
            Outcome::Skipped(problems) => {
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert_eq!(problems[0].field, format!("{PREFIX}{key}"));
                assert_eq!(problems[0].value, format!("{value:?}"));
            }
            other => panic!("{key}={value}: expected a skip, got {other:?}"),
        }
    }
    assert!(matches!(
        from_service(&service(&[("enabled", "yes")], &[("http", 80)])),
        Outcome::Skipped(_)
    ));
    assert!(
        matches!(
            from_service(&service(&[("enabled", "true")], &[])),
            Outcome::Skipped(_)
        ),
        "no port"
    );
}

#[test]
fn an_unnamed_port_is_matched_by_number() {
    let (t, _) = target(from_service(&service(
        &[("enabled", "true"), ("port", "8080")],
        &[("", 8080)],
    )));
    assert_eq!(kube(&t).port_name, "");
}

#[test]
fn the_workload_annotation_names_any_kind_with_a_scale_subresource() {
    let workload = |value: &str| {
        let (t, problems) = target(from_service(&service(
            &[("enabled", "true"), ("workload", value)],
            &[("http", 80)],
        )));
        assert!(problems.is_empty(), "{problems:?}");
        let w = kube(&t).workload.clone();
        (w.api_version(), w.kind, w.plural, w.name)
    };
    let row = |v: &str, k: &str, p: &str, n: &str| {
        (v.to_owned(), k.to_owned(), p.to_owned(), n.to_owned())
    };
    assert_eq!(
        workload("statefulset/db"),
        row("apps/v1", "StatefulSet", "statefulsets", "db")
    );
    assert_eq!(
        workload("sts/db"),
        row("apps/v1", "StatefulSet", "statefulsets", "db")
    );
    assert_eq!(
        workload("Deployment/web"),
        row("apps/v1", "Deployment", "deployments", "web")
    );
    assert_eq!(
        workload("rollout/web"),
        row("argoproj.io/v1alpha1", "Rollout", "rollouts", "web")
    );
    assert_eq!(
        workload("Widget.v1beta2.example.com/w-1"),
        row("example.com/v1beta2", "Widget", "widgets", "w-1")
    );

    // Without the annotation, the Deployment of the Service's name (or wakegate.io/deployment).
    let (t, _) = target(from_service(&service(
        &[("enabled", "true")],
        &[("http", 80)],
    )));
    assert_eq!(kube(&t).workload.to_string(), "deployment/hello");

    // Both at once is ambiguous.
    match from_service(&service(
        &[
            ("enabled", "true"),
            ("workload", "sts/db"),
            ("deployment", "web"),
        ],
        &[("http", 80)],
    )) {
        Outcome::Skipped(problems) => assert_eq!(problems[0].field, "wakegate.io/deployment"),
        other => panic!("expected a skip, got {other:?}"),
    }
}

/// A Service whose ports declare `appProtocol`s: `(name, port, appProtocol)`.
fn service_with_app_protocols(
    annotations: &[(&str, &str)],
    ports: &[(&str, i32, &str)],
) -> Service {
    let mut s = service(annotations, &[]);
    s.spec.as_mut().unwrap().ports = Some(
        ports
            .iter()
            .map(|(name, port, app)| ServicePort {
                name: Some(name.to_string()),
                port: *port,
                app_protocol: (!app.is_empty()).then(|| app.to_string()),
                ..Default::default()
            })
            .collect(),
    );
    s
}

#[test]
fn the_routed_port_s_app_protocol_chooses_http2_and_the_annotation_overrides_it() {
    let on = [("enabled", "true")];
    for (app, expected) in [
        ("kubernetes.io/h2c", Protocol::H2c),
        ("h2c", Protocol::H2c),
        ("grpc", Protocol::H2c),
        ("GRPC", Protocol::H2c),
        ("http2", Protocol::H2c),
        ("", Protocol::Http1),
        ("http", Protocol::Http1),
        ("kubernetes.io/ws", Protocol::Http1),
        ("grpc-web", Protocol::Http1),
    ] {
        let (t, problems) = target(from_service(&service_with_app_protocols(
            &on,
            &[("web", 80, app)],
        )));
        assert_eq!(t.serving.protocol, expected, "appProtocol {app:?}");
        assert!(problems.is_empty(), "{problems:?}");
    }
    // The port routed to decides, not the first one.
    let ports = [("web", 80, ""), ("grpc", 9090, "kubernetes.io/h2c")];
    let (t, _) = target(from_service(&service_with_app_protocols(
        &[("enabled", "true"), ("port", "grpc")],
        &ports,
    )));
    assert_eq!(t.serving.protocol, Protocol::H2c);
    let (t, _) = target(from_service(&service_with_app_protocols(&on, &ports)));
    assert_eq!(t.serving.protocol, Protocol::Http1);
    // The annotation wins over appProtocol, either way.
    let (t, _) = target(from_service(&service_with_app_protocols(
        &[("enabled", "true"), ("protocol", "http1")],
        &[("grpc", 9090, "grpc")],
    )));
    assert_eq!(t.serving.protocol, Protocol::Http1);
    let (t, _) = target(from_service(&service_with_app_protocols(
        &[("enabled", "true"), ("protocol", "h2c")],
        &[("web", 80, "")],
    )));
    assert_eq!(t.serving.protocol, Protocol::H2c);
    // A bad value falls back to what the port says, and says so.
    let (t, problems) = target(from_service(&service_with_app_protocols(
        &[("enabled", "true"), ("protocol", "http2")],
        &[("grpc", 9090, "grpc")],
    )));
    assert_eq!(t.serving.protocol, Protocol::H2c);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].field, "wakegate.io/protocol");
    assert_eq!(problems[0].value, "\"http2\"");
    assert!(
        problems[0]
            .expected
            .contains("\"http1\" or \"h2c\"; using \"h2c\""),
        "{}",
        problems[0].expected
    );
}

#[test]
fn the_rate_limit_annotations_set_a_per_client_limit() {
    let (t, problems) = target(from_service(&service(
        &[("enabled", "true")],
        &[("http", 80)],
    )));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(t.serving.rate_limit, None);
    for (annotations, limit) in [
        (&[("rate-limit", "50")][..], RateLimit::new(50.0)),
        (
            &[("rate-limit", "2.5"), ("rate-limit-burst", "10")][..],
            RateLimit {
                per_second: 2.5,
                burst: 10,
            },
        ),
    ] {
        let mut all = vec![("enabled", "true")];
        all.extend_from_slice(annotations);
        let (t, problems) = target(from_service(&service(&all, &[("http", 80)])));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(t.serving.rate_limit, Some(limit), "{annotations:?}");
    }
}

#[test]
fn a_bad_rate_limit_annotation_is_reported_with_what_was_expected() {
    for (annotations, field, value, expected, limit) in [
        (
            &[("rate-limit", "fast")][..],
            "rate-limit",
            "\"fast\"",
            "above zero",
            None,
        ),
        (
            &[("rate-limit", "0")][..],
            "rate-limit",
            "\"0\"",
            "using no rate limit",
            None,
        ),
        (
            &[("rate-limit", "10"), ("rate-limit-burst", "-1")][..],
            "rate-limit-burst",
            "\"-1\"",
            "using 10",
            Some(RateLimit::new(10.0)),
        ),
        (
            &[("rate-limit-burst", "5")][..],
            "rate-limit-burst",
            "\"5\"",
            "wakegate.io/rate-limit beside it",
            None,
        ),
    ] {
        let mut all = vec![("enabled", "true")];
        all.extend_from_slice(annotations);
        let (t, problems) = target(from_service(&service(&all, &[("http", 80)])));
        let problem = problems
            .iter()
            .find(|p| p.field == format!("wakegate.io/{field}"))
            .unwrap_or_else(|| panic!("a problem for {field} in {problems:?}"));
        assert_eq!(problem.value, value);
        assert!(problem.expected.contains(expected), "{problem}");
        assert_eq!(t.serving.rate_limit, limit, "{annotations:?}");
    }
}

#[test]
fn a_one_letter_workload_kind_is_read_without_panicking() {
    // Found by the annotations fuzz target: kube-core's plural of "Y" underflowed.
    let (t, problems) = target(from_service(&service(
        &[("enabled", "true"), ("workload", "Y.v1.example.io/web")],
        &[("http", 80)],
    )));
    assert!(problems.is_empty(), "{problems:?}");
    let workload = &kube(&t).workload;
    assert_eq!(
        (workload.kind.as_str(), workload.plural.as_str()),
        ("Y", "ys")
    );
}

#[test]
fn prometheus_annotations_make_a_query_source() {
    let (t, problems) = target(from_service(&service(
        &[
            ("enabled", "true"),
            ("prometheus-url", "http://prometheus.monitoring:9090"),
            ("prometheus-interval", "30s"),
        ],
        &[("http", 80)],
    )));
    assert!(problems.is_empty(), "{problems:?}");
    let source = t.scaling.source.as_ref().expect("a source");
    assert_eq!(source.url, "http://prometheus.monitoring:9090");
    assert_eq!(source.every, Duration::from_secs(30));
    assert_eq!(
        source.query_for(&t.namespace, &t.name),
        r#"sum(rate(http_requests_total{job="wakegate",namespace="demo",service="hello"}[2m]))"#
    );
    assert_eq!(t.scaling.target_value(), 100.0);
}

#[test]
fn a_bad_prometheus_annotation_is_reported_and_the_counters_used() {
    for (annotations, field) in [
        (
            vec![("prometheus-url", "prometheus:9090")],
            "prometheus-url",
        ),
        (
            vec![
                ("prometheus-url", "http://prometheus:9090"),
                ("prometheus-query", ""),
            ],
            "prometheus-query",
        ),
        (vec![("prometheus-query", "up")], "prometheus-query"),
    ] {
        let mut all = vec![("enabled", "true")];
        all.extend(annotations);
        let (t, problems) = target(from_service(&service(&all, &[("http", 80)])));
        assert_eq!(t.scaling.source, None, "{field}");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, format!("wakegate.io/{field}"));
        assert!(
            problems[0]
                .expected
                .contains("scaling on in-process counters"),
            "{problems:?}"
        );
    }
}

#[test]
fn a_bad_instance_concurrency_means_no_limit_and_says_why() {
    for bad in ["-1", "two", "1.5", "10001"] {
        let (t, problems) = target(from_service(&service(
            &[("enabled", "true"), ("instance-concurrency", bad)],
            &[("http", 80)],
        )));
        assert_eq!(t.serving.instance_concurrency, 0, "{bad}");
        assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
        let problem = &problems[0];
        assert_eq!(problem.field, "wakegate.io/instance-concurrency");
        assert_eq!(problem.value, format!("{bad:?}"));
        assert!(
            problem.expected.contains("up to 10000") && problem.expected.contains("using 0"),
            "{problem}"
        );
    }
    let (t, problems) = target(from_service(&service(
        &[("enabled", "true"), ("instance-concurrency", "0")],
        &[("http", 80)],
    )));
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(t.serving.instance_limit(), None, "0: no limit");
}
