//! Kubernetes annotations: a Service's `wakegate.io/*` annotations and ports → a target, a
//! skip, or nothing, never a panic. Input lines: `KEY=VALUE` (an annotation; a key without a
//! '/' gets the `wakegate.io/` prefix) or `port NAME NUMBER [APP_PROTOCOL]`.
#![no_main]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use libfuzzer_sys::fuzz_target;
use wakegate::config::annotations::{Outcome, PREFIX, from_service};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut annotations = BTreeMap::new();
    let mut ports = Vec::new();
    for line in text.lines() {
        if let Some(port) = line.strip_prefix("port ") {
            let mut words = port.split(' ');
            let name = words.next().unwrap_or_default();
            let number = words.next().and_then(|n| n.parse().ok()).unwrap_or(80);
            ports.push(ServicePort {
                name: (!name.is_empty()).then(|| name.to_owned()),
                port: number,
                app_protocol: words.next().map(str::to_owned),
                ..Default::default()
            });
        } else if let Some((key, value)) = line.split_once('=') {
            let key = if key.contains('/') {
                key.to_owned()
            } else {
                format!("{PREFIX}{key}")
            };
            annotations.insert(key, value.to_owned());
        }
    }
    let service = Service {
        metadata: ObjectMeta {
            name: Some("svc".into()),
            namespace: Some("ns".into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    };
    match from_service(&service) {
        Outcome::NotEnabled => {}
        Outcome::Skipped(problems) => assert!(!problems.is_empty(), "skipped without a reason"),
        Outcome::Target(target, _) => {
            assert!(!target.route.hosts.is_empty());
            assert!(!target.route.path_prefixes.is_empty());
            assert!(target.scaling.min <= target.scaling.max);
            if let Some(limit) = target.serving.rate_limit {
                let _ = wakegate::target::rate_limit::RateLimiter::new(&limit);
            }
        }
    }
});
