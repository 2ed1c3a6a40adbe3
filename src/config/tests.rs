use super::*;

/// A valid target body (without its `[[target]]` line) that tests extend or override.
const UPSTREAM: &str =
    "name = \"api\"\nhosts = [\"api.localhost\"]\nupstream = \"127.0.0.1:9000\"\n";
const LOCAL: &str = "name = \"hello\"\nhosts = [\"hello.localhost\"]\ncommand = [\"demo\", \"--port\", \"{port}\"]\n";

fn parse(text: &str) -> File {
    File::parse(text).unwrap_or_else(|e| panic!("parses: {e}"))
}

/// The problems of a file with one target made of `base` plus `extra` lines.
fn problems_of_target(base: &str, extra: &str) -> Vec<Problem> {
    parse(&format!("[[target]]\n{base}{extra}\n")).validate()
}

/// Asserts that exactly one problem concerns `field`, with this value, and that its
/// expectation mentions `expected`.
fn assert_problem(problems: &[Problem], field: &str, value: &str, expected: &str) {
    let found: Vec<&Problem> = problems.iter().filter(|p| p.field == field).collect();
    assert_eq!(found.len(), 1, "one problem for {field} in {problems:#?}");
    assert_eq!(found[0].value, value, "value of {field}");
    assert!(
        found[0].expected.contains(expected),
        "{field}: expected {:?} to mention {expected:?}",
        found[0].expected
    );
}

#[test]
fn an_empty_file_is_valid_and_gets_every_default() {
    let config = parse("");
    assert!(config.validate().is_empty());
    assert_eq!(config.listen.proxy, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.listen.admin, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(config.drain_timeout, Duration::from_secs(30));
    assert_eq!(config.autoscaler.interval, Duration::from_secs(1));
    assert!(config.targets.is_empty());
}

#[test]
fn a_minimal_target_gets_its_defaults() {
    let config = parse(&format!("[[target]]\n{LOCAL}"));
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let t = &config.targets[0];
    assert_eq!(t.namespace, "local");
    assert_eq!(t.path_prefixes, ["/"]);
    assert_eq!(t.ready, ReadyCheck::Tcp);
    assert_eq!(t.idle_timeout, Duration::from_secs(300));
    assert_eq!(t.cold_start_timeout, Duration::from_secs(60));
    assert_eq!(t.max_pending, 1000);
    assert_eq!(t.stop_grace, Duration::from_secs(10));
    assert_eq!(t.response_timeout, None);
    assert!(t.env.is_empty());
    assert_eq!(t.cwd, None);
    assert_eq!(t.upstream, None);
    assert_eq!(t.scaling, Scaling::default());
    assert_eq!(t.scaling.min, 0);
    assert_eq!(t.scaling.max, 10);
    assert_eq!(t.scaling.metric, Metric::Concurrency);
    assert_eq!(t.scaling.target_value(), 10.0);
}

#[test]
fn every_field_is_read_as_written() {
    let config = parse(
        r#"
drain_timeout = "5s"
[listen]
proxy = "0.0.0.0:80"
admin = "127.0.0.1:9999"
[autoscaler]
interval = "250ms"
[[target]]
name = "hello"
namespace = "team-a"
hosts = ["hello.localhost", "*.hello.test"]
path_prefixes = ["/", "/api"]
command = ["demo", "--port", "{port}"]
env = { GREETING = "hi" }
cwd = "/tmp"
ready = { http_get = "/healthz" }
idle_timeout = "5m"
cold_start_timeout = "20s"
max_pending = 7
stop_grace = "1s"
response_timeout = "2m"
scaling = { min = 1, max = 1, metric = "rps", target = 25.5 }
"#,
    );
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    assert_eq!(config.drain_timeout, Duration::from_secs(5));
    assert_eq!(config.listen.proxy, "0.0.0.0:80".parse().unwrap());
    assert_eq!(config.autoscaler.interval, Duration::from_millis(250));
    let t = &config.targets[0];
    assert_eq!(t.namespace, "team-a");
    assert_eq!(t.hosts, ["hello.localhost", "*.hello.test"]);
    assert_eq!(t.path_prefixes, ["/", "/api"]);
    assert_eq!(t.env["GREETING"], "hi");
    assert_eq!(t.cwd.as_deref(), Some(Path::new("/tmp")));
    assert_eq!(t.ready, ReadyCheck::HttpGet("/healthz".into()));
    assert_eq!(t.idle_timeout, Duration::from_secs(300));
    assert_eq!(t.cold_start_timeout, Duration::from_secs(20));
    assert_eq!(t.max_pending, 7);
    assert_eq!(t.stop_grace, Duration::from_secs(1));
    assert_eq!(t.response_timeout, Some(Duration::from_secs(120)));
    assert_eq!(t.scaling.metric, Metric::Rps);
    assert_eq!(t.scaling.target_value(), 25.5);
}

#[test]
fn rps_scaling_defaults_to_a_target_of_50() {
    let config = parse(&format!(
        "[[target]]\n{UPSTREAM}scaling = {{ metric = \"rps\" }}\n"
    ));
    assert_eq!(config.targets[0].scaling.target_value(), 50.0);
}

#[test]
fn unknown_fields_are_rejected_by_name_at_every_level() {
    for (text, field) in [
        ("drain_timout = \"1s\"", "drain_timout"),
        ("[listen]\nproxi = \"127.0.0.1:1\"", "proxi"),
        ("[autoscaler]\ninterval_ms = 5", "interval_ms"),
        (&format!("[[target]]\n{UPSTREAM}idle = \"1s\""), "idle"),
        (
            &format!("[[target]]\n{UPSTREAM}scaling = {{ maximum = 3 }}"),
            "maximum",
        ),
        (
            &format!("[[target]]\n{UPSTREAM}ready = {{ http = \"/\" }}"),
            "http",
        ),
    ] {
        let error = File::parse(text).expect_err(text);
        assert!(
            error.contains(&format!("unknown field `{field}`")),
            "{text}: {error}"
        );
    }
}

#[test]
fn every_format_error_of_a_file_is_reported_in_its_order_with_the_right_form() {
    let text = format!(
        "[listen]\nproxy = \":8080\"\n\
         [[target]]\n{LOCAL}idle_timeout = 30\nready = \"/healthz\"\nmaximum = 3\n\
         [[target]]\nhosts = [\"b.localhost\"]\nupstream = \"127.0.0.1:80\"\n\
         [[target]]\n{UPSTREAM}rate_limit = 5\nscaling = {{ max = \"3\" }}\n"
    );
    let error = File::parse(&text).expect_err("eight problems");
    let expected = [
        (
            "line 2",
            "got \":8080\", expected an address and port such as \"0.0.0.0:8080\"",
        ),
        ("line 2", "for every interface write \"0.0.0.0:8080\""),
        (
            "line 7",
            "got 30, expected a duration with its unit, such as \"30s\"",
        ),
        (
            "line 8",
            "invalid type: string \"/healthz\", expected a table such as `{ http_get = \"/healthz\" }`",
        ),
        ("line 9", "unknown field `maximum`"),
        ("line 10", "missing field `name`"),
        (
            "line 17",
            "invalid type: integer `5`, expected a table such as `{ per_second = 50, burst = 100 }`",
        ),
        (
            "line 18",
            "invalid type: string \"3\", expected a whole number",
        ),
    ];
    assert!(error.starts_with("7 problems:\n"), "{error}");
    let mut rest = error.as_str();
    for (line, says) in expected {
        let at = rest
            .find(&format!("{line},"))
            .unwrap_or_else(|| panic!("{line} after the earlier ones in:\n{error}"));
        rest = &rest[at..];
        assert!(rest.contains(says), "{line}: {says}\nin:\n{error}");
    }
    assert!(!error.contains("struct"), "no Rust type names: {error}");
}

#[test]
fn a_bad_duration_names_the_value_and_the_expected_form() {
    let error = File::parse(&format!("[[target]]\n{UPSTREAM}idle_timeout = \"soon\""))
        .expect_err("not a duration");
    assert!(error.contains("got \"soon\""), "{error}");
    assert!(
        error.contains("expected a duration such as \"500ms\", \"30s\" or \"5m\""),
        "{error}"
    );
    let error = File::parse(&format!(
        "[[target]]\n{UPSTREAM}response_timeout = \"later\""
    ))
    .expect_err("not a duration");
    assert!(error.contains("got \"later\""), "{error}");
}

#[test]
fn a_ready_check_must_be_exactly_one_kind() {
    for (ready, got) in [
        ("{}", "{}"),
        ("{ tcp = false }", "{ tcp = false }"),
        ("{ notify = false }", "{ notify = false }"),
        (
            "{ tcp = true, http_get = \"/\" }",
            "{ tcp = true, http_get = \"/\" }",
        ),
        (
            "{ notify = true, http_get = \"/healthz\" }",
            "{ http_get = \"/healthz\", notify = true }",
        ),
        (
            "{ notify = true, tcp = true }",
            "{ tcp = true, notify = true }",
        ),
        ("{ grpc = false }", "{ grpc = false }"),
        (
            "{ grpc = \"echo.Echo\", tcp = true }",
            "{ tcp = true, grpc = \"echo.Echo\" }",
        ),
    ] {
        let error = File::parse(&format!("[[target]]\n{LOCAL}ready = {ready}")).expect_err(ready);
        assert!(error.contains(&format!("got `{got}`")), "{ready}: {error}");
        assert!(
            error.contains(
                "expected exactly one of `{ tcp = true }`, `{ http_get = \"/path\" }`, \
                 `{ notify = true }`, `{ grpc = true }` or `{ grpc = \"package.Service\" }`"
            ),
            "{ready}: {error}"
        );
    }
    for (ready, check) in [
        ("{ tcp = true }", ReadyCheck::Tcp),
        ("{ http_get = \"/up\" }", ReadyCheck::HttpGet("/up".into())),
        ("{ notify = true }", ReadyCheck::Notify),
        ("{ grpc = true }", ReadyCheck::Grpc(String::new())),
        (
            "{ grpc = \"echo.Echo\" }",
            ReadyCheck::Grpc("echo.Echo".into()),
        ),
    ] {
        let protocol = match check {
            ReadyCheck::Grpc(_) => "protocol = \"h2c\"\n",
            _ => "",
        };
        let config = parse(&format!("[[target]]\n{LOCAL}{protocol}ready = {ready}"));
        assert_eq!(config.targets[0].ready, check, "{ready}");
        assert!(
            config.validate().is_empty(),
            "{ready}: {:?}",
            config.validate()
        );
    }
}

#[test]
fn ready_is_for_local_commands_and_an_upstream_is_checked_by_health_check() {
    for (ready, shown) in [
        ("{ notify = true }", "{ notify = true }"),
        ("{ http_get = \"/healthz\" }", "{ http_get = \"/healthz\" }"),
    ] {
        let problems = problems_of_target(UPSTREAM, &format!("ready = {ready}"));
        assert_problem(
            &problems,
            "target[0] (api).ready",
            shown,
            "health = { check = { http_get = \"/healthz\" } }",
        );
    }
    let problems = problems_of_target(LOCAL, "health = { check = { tcp = true } }");
    assert_problem(
        &problems,
        "target[0] (hello).health.check",
        "{ tcp = true }",
        "an `upstream` to check",
    );
    let problems = problems_of_target(UPSTREAM, "health = { check = { notify = true } }");
    assert_problem(
        &problems,
        "target[0] (api).health.check.notify",
        "true",
        "cannot notify",
    );
}

#[test]
fn health_gets_its_defaults_and_an_upstream_its_active_check() {
    let config = parse(&format!("[[target]]\n{UPSTREAM}"))
        .into_config()
        .unwrap();
    let target = &config.targets[0];
    assert_eq!(target.serving.health, HealthPolicy::default());
    assert_eq!(target.serving.health.failures, 3);
    assert_eq!(target.serving.health.interval, Duration::from_secs(5));
    assert!(matches!(
        &target.backend,
        Backend::Fixed(Fixed { check: None, .. })
    ));

    let config = parse(&format!(
        "[[target]]\n{UPSTREAM}health = {{ failures = 1, interval = \"250ms\", check = {{ http_get = \"/healthz\" }} }}"
    ))
    .into_config()
    .unwrap();
    let target = &config.targets[0];
    assert_eq!(
        target.serving.health,
        HealthPolicy {
            failures: 1,
            interval: Duration::from_millis(250)
        }
    );
    match &target.backend {
        Backend::Fixed(fixed) => {
            assert_eq!(fixed.check, Some(ReadyCheck::HttpGet("/healthz".into())))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn health_settings_out_of_range_are_problems_naming_field_value_and_expectation() {
    let problems = problems_of_target(UPSTREAM, "health = { failures = 0, interval = \"1ms\" }");
    assert_problem(
        &problems,
        "target[0] (api).health.failures",
        "0",
        "at least 1",
    );
    assert_problem(
        &problems,
        "target[0] (api).health.interval",
        "\"1ms\"",
        "at least 10ms",
    );
    let problems = problems_of_target(UPSTREAM, "health = { check = { http_get = \"healthz\" } }");
    assert_problem(
        &problems,
        "target[0] (api).health.check.http_get",
        "\"healthz\"",
        "a path starting with '/'",
    );
    let problems = problems_of_target(UPSTREAM, "health = { check = { grpc = true } }");
    assert_problem(
        &problems,
        "target[0] (api).health.check.grpc",
        "\"\" with protocol = \"http1\"",
        "protocol = \"h2c\"",
    );
    let error = File::parse(&format!(
        "[[target]]\n{UPSTREAM}health = {{ interval = \"often\" }}"
    ))
    .expect_err("not a duration");
    assert!(
        error.contains("\"often\"") && error.contains("\"30s\""),
        "{error}"
    );
    let error = File::parse(&format!(
        "[[target]]\n{UPSTREAM}health = {{ checks = {{}} }}"
    ))
    .expect_err("unknown field");
    assert!(
        error.contains("checks") && error.contains("check"),
        "{error}"
    );
}

#[test]
fn an_unknown_metric_is_rejected() {
    let error = File::parse(&format!(
        "[[target]]\n{UPSTREAM}scaling = {{ metric = \"cpu\" }}"
    ))
    .expect_err("cpu");
    assert!(error.contains("cpu"), "{error}");
    assert!(
        error.contains("concurrency") && error.contains("rps"),
        "{error}"
    );
}

#[test]
fn global_durations_must_be_usable() {
    let problems = parse("drain_timeout = \"0s\"\n[autoscaler]\ninterval = \"5ms\"").validate();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_problem(&problems, "drain_timeout", "\"0s\"", "above zero");
    assert_problem(&problems, "autoscaler.interval", "\"5ms\"", "at least 10ms");
}

#[test]
fn the_admin_listener_cannot_share_the_proxy_address() {
    let problems =
        parse("[listen]\nproxy = \"127.0.0.1:8000\"\nadmin = \"127.0.0.1:8000\"").validate();
    assert_problem(
        &problems,
        "listen.admin",
        "127.0.0.1:8000",
        "other than listen.proxy",
    );
    // Port 0 picks two different free ports.
    let ephemeral = parse("[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"");
    assert!(ephemeral.validate().is_empty());
}

#[test]
fn the_external_scaler_listener_is_off_unless_given_and_needs_its_own_address() {
    assert_eq!(parse("").listen.external_scaler, None);
    let on = parse("[listen]\nexternal_scaler = \"0.0.0.0:9091\"");
    assert_eq!(
        on.listen.external_scaler,
        Some("0.0.0.0:9091".parse().unwrap())
    );
    assert!(on.validate().is_empty());
    let shared =
        parse("[listen]\nadmin = \"127.0.0.1:9090\"\nexternal_scaler = \"127.0.0.1:9090\"");
    assert_problem(
        &shared.validate(),
        "listen.external_scaler",
        "127.0.0.1:9090",
        "other than listen.admin's",
    );
    let error = File::parse("[listen]\nexternal_scaler = \":9091\"\n").expect_err("bad address");
    let error = error.to_string();
    assert!(error.contains("line 2"), "{error}");
    assert!(
        error.contains("for every interface write \"0.0.0.0:9091\""),
        "{error}"
    );
}

#[test]
fn proxy_workers_default_to_the_cpus_and_must_be_at_least_one() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(parse("").listen.workers(), cpus);
    assert_eq!(parse("[listen]\nworkers = 3").listen.workers(), 3);
    let problems = parse("[listen]\nworkers = 0").validate();
    assert_problem(&problems, "listen.workers", "0", "at least 1");
}

#[test]
fn target_names_must_be_simple_and_unique() {
    let problems = problems_of_target(
        "name = \"hello world\"\nhosts = [\"a.localhost\"]\nupstream = \"127.0.0.1:1\"\n",
        "",
    );
    assert_problem(
        &problems,
        "target[0].name",
        "\"hello world\"",
        "letters, digits",
    );

    let problems = parse(&format!(
        "[[target]]\n{UPSTREAM}\n[[target]]\nname = \"api\"\nhosts = [\"other.localhost\"]\nupstream = \"127.0.0.1:1\"\n"
    ))
    .validate();
    assert_problem(
        &problems,
        "target[1].name",
        "\"api\"",
        "no other target uses",
    );
}

#[test]
fn a_target_needs_valid_hosts() {
    let problems = problems_of_target("name = \"api\"\nupstream = \"127.0.0.1:9000\"\n", "");
    assert_problem(
        &problems,
        "target[0] (api).hosts",
        "[]",
        "at least one host",
    );

    let problems = problems_of_target(
        "name = \"api\"\nupstream = \"127.0.0.1:9000\"\n",
        "hosts = [\"ok.localhost\", \"http://api.localhost:80\"]",
    );
    assert_problem(
        &problems,
        "target[0] (api).hosts[1]",
        "\"http://api.localhost:80\"",
        "no scheme, port or path",
    );
}

#[test]
fn a_target_needs_valid_path_prefixes() {
    let problems = problems_of_target(UPSTREAM, "path_prefixes = []");
    assert_problem(
        &problems,
        "target[0] (api).path_prefixes",
        "[]",
        "at least one path prefix",
    );
    let problems = problems_of_target(UPSTREAM, "path_prefixes = [\"/ok\", \"api\", \"/a?b\"]");
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert_problem(
        &problems,
        "target[0] (api).path_prefixes[1]",
        "\"api\"",
        "starting with '/'",
    );
    assert_problem(
        &problems,
        "target[0] (api).path_prefixes[2]",
        "\"/a?b\"",
        "without '?'",
    );
}

#[test]
fn two_targets_cannot_claim_the_same_host_and_prefix() {
    let problems = parse(&format!(
        "[[target]]\n{UPSTREAM}\n[[target]]\nname = \"other\"\nhosts = [\"API.localhost\"]\npath_prefixes = [\"/\", \"/v2\"]\nupstream = \"127.0.0.1:1\"\n"
    ))
    .validate();
    assert_problem(
        &problems,
        "target[1] (other).hosts",
        "\"API.localhost\" with prefix \"/\"",
        "not already routed to target \"api\"",
    );

    // The same host with a different prefix is fine; so is "/api" next to "/api/" in one target.
    let config = parse(&format!(
        "[[target]]\n{UPSTREAM}path_prefixes = [\"/api\", \"/api/\"]\n[[target]]\nname = \"root\"\nhosts = [\"api.localhost\"]\nupstream = \"127.0.0.1:1\"\n"
    ));
    assert!(config.validate().is_empty(), "{:?}", config.validate());
}

#[test]
fn a_target_runs_either_a_command_or_an_upstream() {
    let problems = problems_of_target(UPSTREAM, "command = [\"demo\"]");
    assert_problem(
        &problems,
        "target[0] (api).upstream",
        "\"127.0.0.1:9000\"",
        "not both",
    );
    let problems = problems_of_target("name = \"api\"\nhosts = [\"api.localhost\"]\n", "");
    assert_problem(
        &problems,
        "target[0] (api).command",
        "nothing",
        "either `command`",
    );
    let problems = problems_of_target(
        "name = \"api\"\nhosts = [\"api.localhost\"]\n",
        "command = []",
    );
    assert_problem(
        &problems,
        "target[0] (api).command",
        "[]",
        "a program followed by its arguments",
    );
    let problems = problems_of_target(
        "name = \"api\"\nhosts = [\"api.localhost\"]\n",
        "command = [\"\", \"x\"]",
    );
    assert_problem(
        &problems,
        "target[0] (api).command",
        "[\"\", \"x\"]",
        "a program",
    );
}

#[test]
fn an_upstream_is_a_host_and_port() {
    for bad in [
        "127.0.0.1",
        "http://127.0.0.1:9000",
        "127.0.0.1:9000/path",
        "",
    ] {
        let problems = problems_of_target(
            "name = \"api\"\nhosts = [\"api.localhost\"]\n",
            &format!("upstream = {bad:?}"),
        );
        assert_problem(
            &problems,
            "target[0] (api).upstream",
            &format!("{bad:?}"),
            "a host:port",
        );
    }
    for good in ["127.0.0.1:9000", "localhost:80", "[::1]:8080"] {
        let problems = problems_of_target(
            "name = \"api\"\nhosts = [\"api.localhost\"]\n",
            &format!("upstream = {good:?}"),
        );
        assert!(problems.is_empty(), "{good}: {problems:?}");
    }
}

#[test]
fn the_http_ready_check_needs_a_path() {
    let problems = problems_of_target(UPSTREAM, "ready = { http_get = \"healthz\" }");
    assert_problem(
        &problems,
        "target[0] (api).ready.http_get",
        "\"healthz\"",
        "starting with '/'",
    );
}

#[test]
fn a_stream_idle_timeout_is_the_idle_timeout_unless_set() {
    let config = |extra: &str| {
        parse(&format!(
            "[[target]]\n{UPSTREAM}idle_timeout = \"2m\"\n{extra}"
        ))
        .into_config()
        .unwrap()
        .targets
        .remove(0)
        .serving
    };
    assert_eq!(config("").stream_idle_timeout, Duration::from_secs(120));
    let set = config("stream_idle_timeout = \"30s\"\n");
    assert_eq!(set.stream_idle_timeout, Duration::from_secs(30));
    assert_eq!(set.idle_timeout, Duration::from_secs(120));
}

#[test]
fn target_durations_and_queue_must_be_above_zero() {
    let problems = problems_of_target(
        UPSTREAM,
        "cold_start_timeout = \"0s\"\nidle_timeout = \"0s\"\nstream_idle_timeout = \"0s\"\nmax_pending = 0\nresponse_timeout = \"0s\"",
    );
    assert_eq!(problems.len(), 5, "{problems:#?}");
    assert_problem(
        &problems,
        "target[0] (api).cold_start_timeout",
        "\"0s\"",
        "above zero",
    );
    assert_problem(
        &problems,
        "target[0] (api).idle_timeout",
        "\"0s\"",
        "above zero",
    );
    assert_problem(
        &problems,
        "target[0] (api).stream_idle_timeout",
        "\"0s\"",
        "above zero",
    );
    assert_problem(&problems, "target[0] (api).max_pending", "0", "at least 1");
    assert_problem(
        &problems,
        "target[0] (api).response_timeout",
        "\"0s\"",
        "above zero",
    );
}

#[test]
fn scaling_bounds_must_be_consistent() {
    let problems = problems_of_target(UPSTREAM, "scaling = { max = 0 }");
    assert_problem(&problems, "target[0] (api).scaling.max", "0", "at least 1");

    let problems = problems_of_target(UPSTREAM, "scaling = { min = 3, max = 2 }");
    assert_problem(
        &problems,
        "target[0] (api).scaling.min",
        "3",
        "at most scaling.max (2)",
    );

    for bad in ["0", "-1.5", "nan"] {
        let problems = problems_of_target(UPSTREAM, &format!("scaling = {{ target = {bad} }}"));
        assert_problem(
            &problems,
            "target[0] (api).scaling.target",
            &bad.replace("nan", "NaN"),
            "above zero",
        );
    }
}

#[test]
fn local_targets_may_run_several_instances() {
    assert!(problems_of_target(LOCAL, "scaling = { max = 4 }").is_empty());
}

#[test]
fn scaling_windows_and_rates_are_validated() {
    let problems = problems_of_target(
        LOCAL,
        "scaling = { stable_window = \"5s\", panic_window = \"10s\", panic_threshold = 1.0, max_scale_down_rate = 0.5 }",
    );
    assert_problem(
        &problems,
        "target[0] (hello).scaling.panic_window",
        "10s",
        "at most scaling.stable_window (5s)",
    );
    assert_problem(
        &problems,
        "target[0] (hello).scaling.panic_threshold",
        "1",
        "a number above 1",
    );
    assert_problem(
        &problems,
        "target[0] (hello).scaling.max_scale_down_rate",
        "0.5",
        "a number above 1",
    );
}

#[test]
fn scaling_knobs_have_documented_defaults() {
    let s = crate::config::Scaling::default();
    assert_eq!((s.min, s.max), (0, 10));
    assert_eq!(s.stable_window, Duration::from_secs(60));
    assert_eq!(s.panic_window, Duration::from_secs(6));
    assert_eq!(s.panic_threshold, 2.0);
    assert_eq!(s.max_scale_up_rate, 1000.0);
    assert_eq!(s.max_scale_down_rate, 2.0);
    assert_eq!(s.scale_down_delay, Duration::from_secs(30));
    assert_eq!(s.target_value(), 10.0);
}

#[test]
fn every_problem_is_reported_at_once() {
    let problems = parse(
        r#"
drain_timeout = "0s"
[[target]]
name = "nohosts"
upstream = "127.0.0.1:9000"
[[target]]
name = "badup"
hosts = ["badup.localhost"]
upstream = "nowhere"
max_pending = 0
scaling = { min = 3, max = 2 }
"#,
    )
    .validate();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "drain_timeout",
            "target[0] (nohosts).hosts",
            "target[1] (badup).upstream",
            "target[1] (badup).max_pending",
            "target[1] (badup).scaling.min",
        ]
    );
    let error = ConfigError::Invalid {
        path: "wakegate.toml".into(),
        problems,
    };
    let text = error.to_string();
    assert!(
        text.starts_with("config file wakegate.toml has 5 problem(s):\n  - drain_timeout: got \"0s\", expected a duration above zero\n"),
        "{text}"
    );
}

#[test]
fn a_target_is_built_with_exactly_one_backend() {
    let config = parse(&format!("[[target]]\n{LOCAL}\n[[target]]\n{UPSTREAM}"))
        .into_config()
        .expect("valid");
    match &config.targets[0].backend {
        Backend::Local(local) => {
            assert_eq!(local.command, ["demo", "--port", "{port}"]);
            assert_eq!(local.ready, ReadyCheck::Tcp);
            assert_eq!(local.stop_grace, Duration::from_secs(10));
        }
        other => panic!("hello: {other:?}"),
    }
    match &config.targets[1].backend {
        Backend::Fixed(fixed) => assert_eq!(fixed.upstream.as_str(), "127.0.0.1:9000"),
        other => panic!("api: {other:?}"),
    }
    let both = parse(&format!("[[target]]\n{LOCAL}upstream = \"127.0.0.1:1\"\n"));
    let problems = both.clone().into_config().expect_err("both backends");
    assert_problem(
        &problems,
        "target[0] (hello).upstream",
        "\"127.0.0.1:1\"",
        "either `command` or `upstream`, not both",
    );
}

#[test]
fn every_duration_is_bounded_with_a_clear_message() {
    let problems = problems_of_target(
        LOCAL,
        "stop_grace = \"300000000years\"\nidle_timeout = \"400days\"\nresponse_timeout = \"2years\"\nscaling = { scale_down_delay = \"1000days\" }",
    );
    for field in [
        "stop_grace",
        "idle_timeout",
        "response_timeout",
        "scaling.scale_down_delay",
    ] {
        let found = problems
            .iter()
            .find(|p| p.field == format!("target[0] (hello).{field}"))
            .unwrap_or_else(|| panic!("no problem for {field} in {problems:#?}"));
        assert_eq!(found.expected, "a duration of at most 365days", "{field}");
    }
    let problems =
        parse("drain_timeout = \"366days\"\n[autoscaler]\ninterval = \"400days\"").validate();
    assert_problem(
        &problems,
        "drain_timeout",
        "\"1year 18h\"",
        "at most 365days",
    );
    assert_problem(
        &problems,
        "autoscaler.interval",
        "\"1year 1month 4days 7h 26m 24s\"",
        "at most 365days",
    );
    assert!(problems_of_target(LOCAL, "stop_grace = \"365days\"").is_empty());
}

/// The files and README snippets users copy from, parsed as `wakegate run` parses them.
fn shipped(path: &str) -> Config {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    parse(&text)
        .into_config()
        .unwrap_or_else(|problems| panic!("{path}: {problems:#?}"))
}

/// Every ```toml block of a Markdown file.
fn toml_blocks(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```toml") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn the_local_example_keeps_its_meaning() {
    let config = shipped("examples/local.toml");
    assert_eq!(config.listen.proxy, "127.0.0.1:8080".parse().unwrap());
    let [hello, echo] = config.targets.as_slice() else {
        panic!("two targets: {:#?}", config.targets);
    };
    assert_eq!(hello.name, "hello");
    assert_eq!(hello.route.hosts[0].to_string(), "hello.localhost");
    assert_eq!(hello.serving.idle_timeout, Duration::from_secs(30));
    assert_eq!(hello.serving.cold_start_timeout, Duration::from_secs(20));
    let Backend::Local(local) = &hello.backend else {
        panic!("a local process: {:?}", hello.backend);
    };
    assert_eq!(local.command[..2], ["wakegate", "demo-backend"]);
    assert_eq!(local.ready, ReadyCheck::HttpGet("/healthz".into()));
    assert_eq!(hello.serving.protocol, Protocol::Http1);

    assert_eq!(echo.route.hosts[0].to_string(), "echo.localhost");
    assert_eq!(echo.serving.protocol, Protocol::H2c);
    let Backend::Local(local) = &echo.backend else {
        panic!("a local process: {:?}", echo.backend);
    };
    assert_eq!(local.command[..2], ["wakegate", "demo-backend"]);
    assert_eq!(
        local.ready,
        ReadyCheck::Grpc("wakegate.demo.v1.Echo".into())
    );
}

#[test]
fn the_deploy_configurations_keep_their_meaning() {
    for path in [
        "deploy/base/wakegate.toml",
        "deploy/examples/keda/wakegate.toml",
    ] {
        let config = shipped(path);
        assert!(
            config.targets.is_empty(),
            "{path}: targets come from Services"
        );
        assert!(config.kubernetes.is_some(), "{path}");
    }
}

#[test]
fn every_readme_toml_snippet_is_a_valid_configuration() {
    let mut checked = 0;
    for path in ["README.md", "deploy/README.md", "loadtest/README.md"] {
        for block in toml_blocks(path) {
            let config = parse(&block)
                .into_config()
                .unwrap_or_else(|problems| panic!("{path}:\n{block}\n{problems:#?}"));
            // The reference snippet shows a local command, with `upstream` as a comment.
            if block.contains("drain_timeout") {
                for target in &config.targets {
                    assert!(
                        matches!(target.backend, Backend::Local(_)),
                        "{path}: {target:?}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} snippets found");
}

#[test]
fn the_host_policy_names_namespaces_and_plain_domains() {
    let problems = parse(
        "[kubernetes]\nwildcard_namespaces = [\"edge\", \"Bad_NS\"]\n\
         host_domains = { team-a = [\"team-a.example.com\", \"*.example.com\"] }\n",
    )
    .validate();
    assert_problem(
        &problems,
        "kubernetes.wildcard_namespaces",
        "\"Bad_NS\"",
        "namespace names",
    );
    assert_problem(
        &problems,
        "kubernetes.host_domains.team-a",
        "\"*.example.com\"",
        "domain names",
    );
    assert_eq!(problems.len(), 2, "{problems:#?}");

    let ok = parse(
        "[kubernetes]\nwildcard_namespaces = [\"edge\"]\nhost_domains = { team-a = [\"a.example.com\"] }\n",
    );
    assert!(ok.validate().is_empty());
    let k = ok.kubernetes.expect("a kubernetes section");
    let host = |h: &str| crate::config::route::HostPattern::parse(h).unwrap();
    assert!(k.may_claim("edge", &host("*")).is_ok());
    assert!(k.may_claim("team-a", &host("*.a.example.com")).is_err());
    assert!(k.may_claim("team-a", &host("shop.a.example.com")).is_ok());
    assert!(k.may_claim("team-a", &host("a.example.com")).is_ok());
    assert!(k.may_claim("team-a", &host("evil-a.example.com")).is_err());
    // The Service's own cluster-internal names stay allowed.
    assert!(k.may_claim("team-a", &host("web.team-a")).is_ok());
    assert!(
        k.may_claim("team-a", &host("web.team-a.svc.cluster.local"))
            .is_ok()
    );
    assert!(k.may_claim("team-b", &host("web.team-a.svc")).is_err());
}

#[test]
fn the_upstream_protocol_is_http1_by_default_or_h2c() {
    let config = parse(&format!("[[target]]\n{LOCAL}"));
    let t = &config.clone().into_config().unwrap().targets[0];
    assert_eq!(t.serving.protocol, Protocol::Http1);
    let config = parse(&format!("[[target]]\n{LOCAL}protocol = \"h2c\"\n"));
    let t = &config.into_config().unwrap().targets[0];
    assert_eq!(t.serving.protocol, Protocol::H2c);
    let error = File::parse(&format!("[[target]]\n{LOCAL}protocol = \"h2\"\n")).unwrap_err();
    assert!(error.contains("protocol"), "{error}");
    assert!(error.contains("expected `http1` or `h2c`"), "{error}");
}

#[test]
fn a_grpc_readiness_check_needs_an_h2c_target() {
    let problems = problems_of_target(LOCAL, "ready = { grpc = true }");
    assert_problem(
        &problems,
        "target[0] (hello).ready.grpc",
        "\"\" with protocol = \"http1\"",
        "protocol = \"h2c\"",
    );
}

#[test]
fn the_tls_example_serves_two_certificates_on_its_own_port() {
    let config = shipped("examples/tls.toml");
    let tls = config.tls.expect("[tls]");
    assert_eq!(tls.listen, "127.0.0.1:8443".parse().unwrap());
    assert_eq!(
        tls.certificates,
        ["hello", "echo"].map(|name| CertificateFiles {
            cert: format!("examples/tls/{name}.localhost.crt").into(),
            key: format!("examples/tls/{name}.localhost.key").into(),
        })
    );
    assert_eq!(config.targets.len(), 2);
}

#[test]
fn tls_needs_a_certificate_and_a_port_of_its_own() {
    let problems = parse("[tls]\n").validate();
    assert_problem(&problems, "tls.certificate", "none", "at least one");

    let problems = parse(
        "[listen]\nproxy = \"127.0.0.1:8080\"\n[tls]\nlisten = \"127.0.0.1:8080\"\n\
         [[tls.certificate]]\ncert = \"a.crt\"\nkey = \"a.key\"\n",
    )
    .validate();
    assert_problem(
        &problems,
        "tls.listen",
        "127.0.0.1:8080",
        "other than listen.proxy",
    );

    let error = File::parse("[tls]\n[[tls.certificate]]\ncert = \"a.crt\"\n").unwrap_err();
    assert!(error.contains("missing field `key`"), "{error}");
}

#[test]
fn limits_have_safe_defaults_and_take_what_the_file_says() {
    let config = parse("");
    assert_eq!(config.limits, Limits::default());
    assert_eq!(config.limits.header_read_timeout, Duration::from_secs(30));
    assert_eq!(config.limits.idle_timeout, Duration::from_secs(60));
    assert_eq!(config.limits.max_header_bytes, 64 * 1024);
    assert_eq!(config.limits.max_connections, 10_000);

    let config = parse(
        "[limits]\nheader_read_timeout = \"5s\"\nidle_timeout = \"2m\"\nmax_header_bytes = 16384\n\
         max_concurrent_streams = 50\nmax_connections = 2\n",
    );
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let limits = config.into_config().unwrap().limits;
    assert_eq!(limits.header_read_timeout, Duration::from_secs(5));
    assert_eq!(limits.idle_timeout, Duration::from_secs(120));
    assert_eq!(limits.max_header_bytes, 16384);
    assert_eq!(limits.max_concurrent_streams, 50);
    assert_eq!(limits.max_connections, 2);
    assert_eq!(limits.max_headers, 100, "the rest keep their defaults");
}

#[test]
fn held_bytes_and_the_memory_budget_are_sizes_with_units() {
    let config = parse("");
    assert_eq!(config.limits.max_held_requests, 20_000);
    assert_eq!(config.limits.max_held_bytes, 256 << 20);
    assert_eq!(
        config.limits.memory_budget, None,
        "derived from the machine"
    );
    let config = parse(&format!(
        "[limits]\nmax_held_bytes = \"1 GiB\"\nmemory_budget = \"512MiB\"\n\
         [[target]]\n{UPSTREAM}max_pending_bytes = 1048576\n"
    ));
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let config = config.into_config().unwrap();
    assert_eq!(config.limits.max_held_bytes, 1 << 30);
    assert_eq!(config.limits.memory_budget, Some(512 << 20));
    assert_eq!(config.targets[0].serving.max_pending_bytes, 1 << 20);

    let problems = parse(&format!(
        "[limits]\nmax_held_bytes = \"1KiB\"\nmemory_budget = \"1MiB\"\nmax_held_requests = 0\n\
         [[target]]\n{UPSTREAM}max_pending_bytes = \"10 KB\"\n"
    ))
    .validate();
    assert_problem(
        &problems,
        "limits.max_held_bytes",
        "1 KiB",
        "at least 64 KiB",
    );
    assert_problem(&problems, "limits.memory_budget", "1 MiB", "at least 4 MiB");
    assert_problem(&problems, "limits.max_held_requests", "0", "at least 1");
    assert_problem(
        &problems,
        "target[0] (api).max_pending_bytes",
        "9.8 KiB",
        "at least 64 KiB",
    );
    let error = File::parse("[limits]\nmemory_budget = \"64M\"\n").unwrap_err();
    assert!(
        error.contains("got \"64M\" (unknown unit \"M\"), expected a size such as \"64MiB\""),
        "{error}"
    );
}

#[test]
fn limits_out_of_range_are_problems_naming_field_value_and_expectation() {
    let problems = parse(
        "[limits]\nheader_read_timeout = \"10ms\"\nidle_timeout = \"0s\"\nmax_header_bytes = 100\n\
         max_concurrent_streams = 0\nmax_connections = 0\n",
    )
    .validate();
    assert_problem(
        &problems,
        "limits.header_read_timeout",
        "\"10ms\"",
        "at least 100ms",
    );
    assert_problem(&problems, "limits.idle_timeout", "\"0s\"", "at least 100ms");
    assert_problem(&problems, "limits.max_header_bytes", "100", "from 8192");
    assert_problem(
        &problems,
        "limits.max_concurrent_streams",
        "0",
        "at least 1",
    );
    assert_problem(&problems, "limits.max_connections", "0", "at least 1");
    assert_eq!(problems.len(), 5, "{problems:#?}");
    assert!(
        File::parse("[limits]\nmax_body = 1\n").is_err(),
        "unknown fields are refused"
    );
}

#[test]
fn a_rate_limit_is_optional_and_its_burst_defaults_to_one_second_s_worth() {
    let config = parse(&format!("[[target]]\n{UPSTREAM}"))
        .into_config()
        .unwrap();
    assert_eq!(config.targets[0].serving.rate_limit, None);
    for (written, per_second, burst) in [
        ("{ per_second = 50, burst = 100 }", 50.0, 100),
        ("{ per_second = 20 }", 20.0, 20),
        ("{ per_second = 0.5 }", 0.5, 1),
    ] {
        let text = format!("[[target]]\n{UPSTREAM}rate_limit = {written}\n");
        let config = parse(&text).into_config().unwrap();
        assert_eq!(
            config.targets[0].serving.rate_limit,
            Some(RateLimit { per_second, burst }),
            "{written}"
        );
    }
}

#[test]
fn a_bad_rate_limit_names_its_field_value_and_expectation() {
    for (written, field, value, expected) in [
        ("{ per_second = 0 }", "per_second", "0", "above zero"),
        ("{ per_second = -3 }", "per_second", "-3", "above zero"),
        ("{ per_second = nan }", "per_second", "NaN", "above zero"),
        (
            "{ per_second = 2e6 }",
            "per_second",
            "2000000",
            "at most 1000000",
        ),
        ("{ per_second = 5, burst = 0 }", "burst", "0", "at least 1"),
    ] {
        let problems = problems_of_target(UPSTREAM, &format!("rate_limit = {written}"));
        assert_problem(
            &problems,
            &format!("target[0] (api).rate_limit.{field}"),
            value,
            expected,
        );
    }
    let unknown = File::parse(&format!(
        "[[target]]\n{UPSTREAM}rate_limit = {{ per_second = 5, per_minute = 3 }}\n"
    ))
    .unwrap_err();
    assert!(unknown.contains("per_minute"), "{unknown}");
}

#[test]
fn a_prometheus_source_is_read_with_its_defaults() {
    let file = parse(&format!(
        "[[target]]\n{LOCAL}scaling = {{ source = {{ prometheus = \"http://prometheus:9090\" }} }}\n"
    ));
    let scaling = &file.targets[0].scaling;
    let source = scaling.source.as_ref().expect("a source");
    assert_eq!(source.url, "http://prometheus:9090");
    assert_eq!(source.every, Duration::from_secs(15));
    assert_eq!(
        source.query_for("demo", "hello"),
        r#"sum(rate(http_requests_total{job="wakegate",namespace="demo",service="hello"}[2m]))"#
    );
    assert_eq!(scaling.target_value(), 100.0);
}

#[test]
fn a_prometheus_source_is_validated() {
    let problems = problems_of_target(
        LOCAL,
        "scaling = { source = { prometheus = \"https://prom:9090\", query = \" \", every = \"0s\" } }",
    );
    assert_problem(
        &problems,
        "target[0] (hello).scaling.source.prometheus",
        "\"https://prom:9090\"",
        "an http:// URL",
    );
    assert_problem(
        &problems,
        "target[0] (hello).scaling.source.query",
        "\" \"",
        "a non-empty PromQL expression",
    );
    assert_problem(
        &problems,
        "target[0] (hello).scaling.source.every",
        "\"0s\"",
        "a duration",
    );
}

#[test]
fn instance_concurrency_is_unlimited_by_default_and_read_when_given() {
    let config = parse(&format!("[[target]]\n{LOCAL}"));
    assert_eq!(config.targets[0].instance_concurrency, 0);
    let built = config.into_config().unwrap();
    assert_eq!(built.targets[0].serving.instance_concurrency, 0);
    assert_eq!(built.targets[0].serving.instance_limit(), None);

    let config = parse(&format!("[[target]]\n{LOCAL}instance_concurrency = 2\n"));
    assert!(config.validate().is_empty(), "{:?}", config.validate());
    let built = config.into_config().unwrap();
    assert_eq!(built.targets[0].serving.instance_concurrency, 2);
    assert_eq!(
        built.targets[0].serving.instance_limit().map(|n| n.get()),
        Some(2)
    );
}

#[test]
fn instance_concurrency_out_of_range_is_a_problem_naming_field_value_and_expectation() {
    let problems = problems_of_target(LOCAL, "instance_concurrency = 10001");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_problem(
        &problems,
        "target[0] (hello).instance_concurrency",
        "10001",
        "0 (no limit) or a whole number of requests up to 10000",
    );
    assert!(problems_of_target(LOCAL, "instance_concurrency = 10000").is_empty());
    for bad in ["-1", "1.5", "\"2\""] {
        let error = File::parse(&format!("[[target]]\n{LOCAL}instance_concurrency = {bad}"))
            .expect_err(bad);
        assert!(error.contains("line 5"), "{bad}: {error}");
        assert!(error.contains("expected a whole number"), "{bad}: {error}");
    }
}
