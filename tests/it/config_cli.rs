//! `sluice check` and config errors: exit codes, file:line:column, key
//! paths, every error listed, secrets never printed.

use crate::support::*;

/// Writes `toml` to a temp file and runs `sluice check` on it.
fn check(toml: &str, env: &[(&str, &str)]) -> (i32, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, toml).unwrap();
    let p = path.to_str().unwrap().to_owned();
    let (code, out, err) = run_cli(&["check", "--config", &p], env);
    (code, out, err, p)
}

#[test]
fn the_example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let (code, out, err) = run_cli(
        &["check", "--config", example],
        &[("OPENAI_API_KEY", "sk-x")],
    );
    assert_eq!((code, out.trim()), (0, "ok"), "stderr: {err}");
}

#[test]
fn the_example_config_documents_every_key() {
    // Every key of the resolved sections appears (active or commented) with a comment.
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    for key in [
        "listen",
        "admin_listen",
        "max_request_body",
        "retry_buffer",
        "header_read_timeout",
        "shutdown_grace",
        "send_timeout",
        "max_connections",
        "tls",
        "level",
        "format",
        "url",
        "api_key_env",
        "api_key_file",
        "auth",
        "headers",
        "connect_timeout",
        "ca_file",
        "name",
        "path_prefix",
        "methods",
        "strip_prefix",
        "upstream",
        "endpoint",
        "service_name",
        "sample_ratio",
        "propagate_upstream",
    ] {
        documented(&text, "config.example.toml", key);
    }
    // The LLM layer's keys, in the example with models.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config.models.example.toml"
    ))
    .unwrap();
    for key in [
        "preset",
        "inject_usage",
        "azure_api",
        "api_version",
        "consecutive_failures",
        "failure_ratio",
        "min_requests",
        "window",
        "base_ejection",
        "max_ejection",
        "auth_ejection",
        "honor_rate_limit_headers",
        "balance",
        "hash_header",
        "attempts",
        "fallbacks",
        "on_all_ejected",
        "model_routing",
        "models",
        "unknown_model",
        "peek_limit",
        "list_models",
        "fallback_on",
        "commit",
        "commit_buffer",
        "inject",
        "observe",
        "tokens_per_minute",
        "count",
        "chars_per_token",
        "image_tokens",
        "default_output_tokens",
        "keepalive",
    ] {
        documented(&text, "config.models.example.toml", key);
    }
}

/// `key = ...` appears in `text`, active or commented out, with a comment.
fn documented(text: &str, file: &str, key: &str) {
    {
        let line = text
            .lines()
            .find(|l| {
                l.trim_start()
                    .trim_start_matches("# ")
                    .starts_with(&format!("{key} ="))
            })
            .unwrap_or_else(|| panic!("{file} lacks {key}"));
        assert!(line.contains(" # "), "{key} has no comment: {line}");
    }
}

#[test]
fn config_is_found_through_sluice_config_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(&path, one_route("http://127.0.0.1:1", "")).unwrap();
    let (code, out, _) = run_cli(&["check"], &[("SLUICE_CONFIG", path.to_str().unwrap())]);
    assert_eq!((code, out.trim()), (0, "ok"));
}

#[test]
fn unknown_key_names_file_line_column_and_path() {
    let toml = format!(
        "{}\n[[routes]]\nname = \"b\"\nupstream = \"up\"\nretry_attempts = 3\n",
        one_route("http://h", "")
    );
    let (code, out, err, file) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(out.is_empty());
    assert!(
        err.contains(&format!(
            "{file}:12:1: routes[1].retry_attempts: unknown field `retry_attempts`"
        )),
        "{err}"
    );
}

#[test]
fn unknown_upstream_is_named_with_the_known_ones() {
    let toml = "[upstreams.openai]\nurl = \"https://api.openai.com\"\n\n[[routes]]\nname = \"r\"\nupstream = \"opneai\"\n";
    let (code, _, err, file) = check(toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{file}:6:12: routes[0].upstream: unknown upstream \"opneai\" (defined: openai)"
        )),
        "{err}"
    );
}

#[test]
fn missing_key_variable_is_named() {
    let (code, _, err, file) = check(
        &one_route("http://h", "api_key_env = \"SLUICE_TEST_NO_SUCH_VAR\""),
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{file}:3:15: upstreams.up.api_key_env: environment variable SLUICE_TEST_NO_SUCH_VAR is not set")), "{err}");
}

#[test]
fn bad_duration_and_bad_size_are_located() {
    let (code, _, err, file) = check(
        &format!(
            "[server]\nshutdown_grace = \"30 secs please\"\n{}",
            one_route("http://h", "")
        ),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{file}:2:18: server.shutdown_grace: invalid duration \"30 secs please\""
        )),
        "{err}"
    );

    let (code, _, err, file) = check(
        &format!(
            "[server]\nmax_request_body = \"32 MegaBytes\"\n{}",
            one_route("http://h", "")
        ),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{file}:2:20: server.max_request_body: invalid size \"32 MegaBytes\""
        )),
        "{err}"
    );

    let toml = format!(
        "[server]\nshutdown_grace = \"500000000y\"\n{}",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(":2:18: server.shutdown_grace: duration \"500000000y\" is over 365 days"),
        "{err}"
    );

    let (code, _, err, _) = check("[upstreams.up]\nurl = \"http://h\"\nconnect_timeout = 10\n[[routes]]\nname = \"r\"\nupstream = \"up\"\n", &[]);
    assert_eq!(code, 1);
    assert!(err.contains(":3:19: upstreams.up.connect_timeout: invalid type: integer `10`, expected a duration string"), "{err}");
}

#[test]
fn sizes_and_durations_accept_their_documented_forms() {
    let toml = format!(
        "[server]\nmax_request_body = 1048576\nretry_buffer = \"512KiB\"\nheader_read_timeout = \"250ms\"\nshutdown_grace = \"5m\"\n{}",
        one_route("http://h", "")
    );
    let c = parse(&toml, &[]).unwrap();
    assert_eq!(c.server.max_request_body, 1 << 20);
    assert_eq!(c.server.retry_buffer, 512 << 10);
    assert_eq!(
        c.server.header_read_timeout,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(c.server.shutdown_grace, std::time::Duration::from_secs(300));
    let c = parse(
        &format!(
            "[server]\nmax_request_body = \"32MiB\"\n{}",
            one_route("http://h", "")
        ),
        &[],
    )
    .unwrap();
    assert_eq!(c.server.max_request_body, 32 << 20);
}

#[test]
fn every_semantic_error_is_listed() {
    let toml = r#"
[server]
listen = "localhost"

[upstreams.a]
url = "ftp://example.com"
api_key_env = "K"
api_key_file = "/k"

[[routes]]
name = "r"
path_prefix = "v1"
methods = ["GE T"]
upstream = "b"

[[routes]]
name = "r"
upstream = "a"
"#;
    let (code, _, err, _) = check(toml, &[]);
    assert_eq!(code, 1);
    for expected in [
        ":3:10: server.listen: invalid address",
        ":6:7: upstreams.a.url: invalid url \"ftp://example.com\"",
        ":8:16: upstreams.a.api_key_file: set api_key_env or api_key_file, not both",
        ":12:15: routes[0].path_prefix: must start with \"/\"",
        ":13:12: routes[0].methods[0]: \"GE T\" is not one of GET, HEAD, POST",
        ":14:12: routes[0].upstream: unknown upstream \"b\"",
        ":17:8: routes[1].name: duplicate route name \"r\"",
        "sluice: 7 error(s) in the config",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn syntax_errors_and_missing_files_exit_1() {
    let (code, _, err, file) = check("[upstreams.a\nurl = 1\n", &[]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{file}:1:13:")), "{err}");

    let (code, _, err) = run_cli(&["check", "--config", "/nonexistent/sluice.toml"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/sluice.toml: cannot read config"),
        "{err}"
    );

    let (code, _, err, _) = check("", &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no [upstreams.NAME] table") && err.contains("no [[routes]] entry"),
        "{err}"
    );
}

#[test]
fn a_key_value_never_appears_in_errors() {
    // The key is present; other problems, including one about the key, are reported.
    let secret = "sk-live-DO-NOT-PRINT-0123456789";
    let toml = "[upstreams.a]\nurl = \"http://h\"\napi_key_env = \"K\"\nauth = \"none\"\n[upstreams.b]\nurl = \"http://h\"\napi_key_env = \"K2\"\n[[routes]]\nname = \"r\"\nupstream = \"zz\"\n";
    let (code, out, err, _) = check(toml, &[("K", secret), ("K2", "bad\u{1}key-DO-NOT-PRINT")]);
    assert_eq!(code, 1);
    assert!(err.contains("auth = \"none\" sends no key"), "{err}");
    assert!(
        err.contains("has characters not allowed in an HTTP header"),
        "{err}"
    );
    assert!(
        !err.contains("DO-NOT-PRINT") && !out.contains("DO-NOT-PRINT"),
        "{err}"
    );
    // Nor in the config's Debug form (panics and debug logs print it).
    let c = parse(
        &one_route("http://h", "api_key_env = \"K\""),
        &[("K", secret)],
    )
    .unwrap();
    assert!(!format!("{c:?}").contains(secret));
}

#[test]
fn reserved_or_invalid_extra_headers_are_rejected() {
    for (h, why) in [
        ("Host", "cannot be configured"),
        ("transfer-encoding", "cannot be configured"),
        ("bad header", "not a valid header name"),
        ("X-Api-Key", "carries a key"),
        ("x-request-id", "cannot be configured"),
    ] {
        let toml = one_route("http://h", &format!("headers = {{ \"{h}\" = \"v\" }}"));
        let err = parse(&toml, &[]).unwrap_err().to_string();
        // A name with a space is quoted in the key path, as TOML writes it.
        let key = if h.contains(' ') {
            format!("\"{h}\"")
        } else {
            h.to_owned()
        };
        assert!(
            err.contains(&format!("upstreams.up.headers.{key}")) && err.contains(why),
            "{err}"
        );
    }
}

#[test]
fn version_and_help() {
    let (code, out, _) = run_cli(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.starts_with("sluice "));
    let (code, out, _) = run_cli(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("check") && out.contains("--config"));
}

#[test]
fn retry_and_timeout_keys_are_checked() {
    let toml = format!(
        "{}\n[routes.timeouts]\nidle = \"0s\"\n[routes.retry]\nattempts = 0\nretry_on = [\"timeouts\", 200, 503]\nbudget_ratio = 0.0\nbackoff_base = \"2s\"\nbackoff_max = \"1s\"\nbudget_ttl = \"5m\"\n",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    for expected in [
        "routes[0].timeouts.idle: must be greater than 0",
        "routes[0].retry.attempts: must be from 1 (no retries) to 10",
        "routes[0].retry.retry_on[0]: unknown condition \"timeouts\"",
        "routes[0].retry.retry_on[1]: 200 is not a 4xx or 5xx status code",
        "routes[0].retry.budget_ratio: must be from 0.001 to 1000",
        "routes[0].retry.backoff_max: must not be less than backoff_base",
        "routes[0].retry.budget_ttl: must be from 1s to 60s",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    // Every message is located on a line of the file.
    assert!(
        err.lines().filter(|l| l.contains("routes[0].")).all(|l| l
            .split(':')
            .nth(1)
            .is_some_and(|n| n.parse::<u32>().is_ok())),
        "{err}"
    );
    let (code, _, err, _) = check(
        &format!(
            "{}\n[routes.retry]\nretry_on = [true]\n",
            one_route("http://h", "")
        ),
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("routes[0].retry.retry_on[0]") && err.contains("a status code or one of"),
        "{err}"
    );
}

#[test]
fn values_that_would_only_fail_at_runtime_are_caught() {
    let secret = "Bearer sk-live-DO-NOT-PRINT";
    let toml = r#"
[upstreams."azure.east"]
url = "http://127.0.0.1:80800"
headers = { authorization = "Bearer x" }

[upstreams.nohost]
url = "http://:8080"

[upstreams.k]
url = "http://h"
api_key_env = "K"

[[routes]]
name = "r"
path_prefix = "/v1?x=1"
methods = ["PSOT"]
upstream = "k"
"#;
    let (code, _, err, _) = check(toml, &[("K", secret)]);
    assert_eq!(code, 1);
    for expected in [
        r#":3:7: upstreams."azure.east".url: invalid url "http://127.0.0.1:80800": the port must be a number"#,
        r#":4:29: upstreams."azure.east".headers.authorization: "authorization" carries a key"#,
        r#"upstreams.nohost.url: invalid url "http://:8080": no host"#,
        r#"upstreams.k.api_key_env: the key in environment variable K starts with "Bearer ""#,
        "routes[0].path_prefix: must be a plain path",
        r#"routes[0].methods[0]: "PSOT" is not one of GET"#,
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("DO-NOT-PRINT"), "{err}");
}

#[test]
fn rate_limit_keys_are_checked() {
    let toml = format!(
        "{}\n[routes.rate_limit]\nrequests_per_minute = 10\nburst = 0\nper = \"tenant\"\n",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "routes[0].rate_limit.per: unknown variant `tenant`, expected `route` or `client`"
        ),
        "{err}"
    );
    let toml = format!(
        "{}\n[routes.rate_limit]\nburst = 0\nclient_key_header = \"bad header\"\n",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("routes[0].rate_limit.burst: must be at least 1"),
        "{err}"
    );
    assert!(
        err.contains("routes[0].rate_limit.client_key_header: not a valid header name"),
        "{err}"
    );
    let toml = format!(
        "{}\n[routes.rate_limit]\nrequests_per_minute = 0\n",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(err.contains("this table limits nothing"), "{err}");
}

#[test]
fn token_limit_usage_and_sse_keys_are_checked() {
    let toml = format!(
        "{}\n[routes.token_limit]\nper = \"tenant\"\nchars_per_token = 0\n",
        one_route("http://h", "")
    );
    let (code, _, err, file) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "{file}:10:7: routes[0].token_limit.per: unknown variant `tenant`"
        )),
        "{err}"
    );
    let toml = format!(
        "{}\n[routes.token_limit]\nchars_per_token = 0\nshared = true\n[routes.usage]\nobserve = false\n",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    for e in [
        "routes[0].token_limit.tokens_per_minute: must be set",
        "routes[0].token_limit.chars_per_token: must be a number above 0",
        "routes[0].token_limit.shared: shared = true needs a [rate_limit_store] table",
        "routes[0].usage.observe: a route with a token_limit settles",
    ] {
        assert!(err.contains(e), "{e}: {err}");
    }
    let toml = format!(
        "{}\n[routes.usage]\ninject = \"sometimes\"\n[routes.sse]\nkeepalive = \"soon\"\n",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("routes[0].usage.inject: unknown variant `sometimes`"),
        "{err}"
    );
    let toml = format!(
        "{}\n[routes.token_limit]\ntokens_per_minute = 6000\nchars_per_token = 3.5\n[routes.sse]\nkeepalive = \"15s\"\n",
        one_route("http://h", "")
    );
    let (code, out, err, _) = check(&toml, &[]);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
}

#[test]
fn models_and_presets_are_checked_with_their_place() {
    let toml = r#"
[upstreams.oa]
preset = "openai"
api_key_env = "K"

[upstreams.claude]
preset = "anthropic"
api_key_env = "K"

[upstreams.az]
preset = "azure"
azure_api = "deployments"

[upstreams.plain]
api_key_env = "K"

[upstreams.vllm]
preset = "vllm"
azure_api = "v1"

[models.mixed]
deployments = [{ upstream = "oa" }, { upstream = "claude" }]

[models.fast]
deployments = [{ upstream = "oa", weight = 0 }, { upstream = "nowhere" }]
fallbacks = ["fast", "ghost", "sonnet"]
balance = "hash"
attempts = 11

[models.sonnet]
deployments = []

[[routes]]
name = "llm"
path_prefix = "/v1"
model_routing = true
models = ["fast", "unknown"]
unknown_model = "passthrough"

[[routes]]
name = "plain"
path_prefix = "/x"
models = ["fast"]

[[routes.retry]]
"#;
    // The last table is an array by mistake: TOML itself refuses it.
    let (code, _, err, _) = check(toml, &[("K", "sk-x")]);
    assert_eq!(code, 1);
    assert!(err.contains("routes"), "{err}");
    let toml = toml.replace(
        "[[routes.retry]]",
        "[routes.retry]\nfallback_on = [\"reset\", \"sometimes\", 302]\n",
    );
    let (code, _, err, _) = check(&toml, &[("K", "sk-x")]);
    assert_eq!(code, 1);
    for expected in [
        "upstreams.az: missing field `url`: an Azure resource's endpoint",
        "upstreams.vllm.azure_api: only for preset = \"azure\"",
        "upstreams.plain: missing field `url` (or set a preset",
        "models.mixed.deployments: mixes the OpenAI and Anthropic dialects",
        "models.fast.deployments[0].weight: must be at least 1",
        "models.fast.deployments[1].upstream: unknown upstream \"nowhere\"",
        "models.fast.fallbacks[0]: a model cannot be its own fallback",
        "models.fast.fallbacks[1]: unknown model \"ghost\"",
        "models.fast.hash_header: balance = \"hash\" needs the header",
        "models.fast.attempts: must be from 1 to 10",
        "models.sonnet.deployments: must list at least one deployment",
        "routes[0].models[1]: unknown model \"unknown\"",
        "routes[0].unknown_model: \"passthrough\" needs the route's upstream",
        "routes[1]: missing field `upstream` (or set model_routing = true)",
        "routes[1].retry.fallback_on[1]: unknown condition \"sometimes\"",
        "routes[1].retry.fallback_on[2]: 302 is not a 4xx or 5xx status code",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        // Said once, not once per pass over the table.
        assert_eq!(
            err.matches(expected).count(),
            1,
            "{expected:?} twice in:\n{err}"
        );
    }
    // Every problem has a line and column.
    for line in err.lines().filter(|l| l.contains(": ")) {
        if line.contains("sluice.toml:") {
            assert!(
                line.split(':')
                    .nth(1)
                    .unwrap()
                    .trim()
                    .parse::<u32>()
                    .is_ok(),
                "{line}"
            );
        }
    }
}

#[test]
fn a_fallback_chain_keeps_to_one_dialect_and_a_route_too() {
    let toml = r#"
[upstreams.oa]
preset = "openai"
api_key_env = "K"

[upstreams.claude]
preset = "anthropic"
api_key_env = "K"

[models.gpt]
deployments = [{ upstream = "oa" }]
fallbacks = ["sonnet"]

[models.sonnet]
deployments = [{ upstream = "claude" }]

[[routes]]
name = "llm"
model_routing = true
"#;
    let (code, _, err, _) = check(toml, &[("K", "sk-x")]);
    assert_eq!(code, 1);
    assert!(err.contains("models.gpt.fallbacks[0]: \"sonnet\" speaks the Anthropic dialect and \"gpt\" the OpenAI: a chain keeps to one"), "{err}");
    let toml = toml.replace("fallbacks = [\"sonnet\"]\n", "");
    let (code, _, err, _) = check(&toml, &[("K", "sk-x")]);
    assert_eq!(code, 1);
    assert!(err.contains("routes[0].models: mixes the"), "{err}");
    let toml = toml.replace(
        "model_routing = true",
        "model_routing = true\nmodels = [\"sonnet\"]",
    );
    let (code, out, err, _) = check(&toml, &[("K", "sk-x")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok") || !out.is_empty(), "{out}");
}

#[test]
fn the_models_example_config_passes_check() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.models.example.toml");
    let keys = [
        ("OPENAI_KEY_A", "sk-a"),
        ("OPENAI_KEY_B", "sk-b"),
        ("AZURE_EAST_KEY", "az"),
    ];
    let (code, out, err) = run_cli(&["check", "--config", example], &keys);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn the_rate_limit_store_is_checked_and_its_password_never_shown() {
    let shared = "\n[routes.rate_limit]\nrequests_per_minute = 60\nburst = 1\nshared = true\n";
    let toml = format!("{}{shared}", one_route("http://h", ""));
    let (code, _, err, file) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{file}:"))
            && err.contains(
                "routes[0].rate_limit.shared: shared = true needs a [rate_limit_store] table"
            ),
        "{err}"
    );
    let store = |lines: &str| {
        format!(
            "[rate_limit_store]\n{lines}\n\n{}{shared}",
            one_route("http://h", "")
        )
    };
    for (lines, want) in [
        ("url = \"\"", "rate_limit_store.url: must be set"),
        (
            "url = \"http://x\"",
            "rate_limit_store.url: not a redis:// or rediss:// URL",
        ),
        (
            "url = \"rediss://x:6380\"\nca_file = \"nope.pem\"",
            "rate_limit_store.ca_file: cannot read CA file nope.pem",
        ),
        (
            "url = \"redis://x:6380\"\nca_file = \"nope.pem\"",
            "rate_limit_store.ca_file: a CA is for rediss:// URLs",
        ),
        (
            "url = \"redis://x:7000\"\nnodes = [\"redis://y:7001\"]",
            "rate_limit_store.nodes: seed nodes are for a cluster: set cluster = true",
        ),
        (
            "url = \"redis://x:7000\"\ncluster = true\nnodes = [\"rediss://y:7001\"]",
            "every node must use the url's scheme",
        ),
        (
            "url = \"redis://x:7000\"\ncluster = true\nnodes = [\"redis://:hunter2@y:7001\"]",
            "rate_limit_store.nodes: a password in the url is not supported",
        ),
        (
            "url = \"redis://:hunter2@x\"",
            "a password in the url is not supported",
        ),
        (
            "url = \"redis://x\"\npassword_env = \"NOPE\"",
            "environment variable NOPE is not set",
        ),
        (
            "url = \"redis://x\"\npassword_env = \"P\"\npassword_file = \"p\"",
            "set password_env or password_file, not both",
        ),
        (
            "url = \"redis://x\"\nreplicas = 0",
            "rate_limit_store.replicas: must be at least 1",
        ),
        (
            "url = \"redis://x\"\non_error = \"maybe\"",
            "unknown variant `maybe`",
        ),
    ] {
        let (code, _, err, _) = check(&store(lines), &[("P", "hunter2")]);
        assert_eq!(code, 1, "{lines}");
        assert!(err.contains(want), "{lines}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    let (code, out, err, _) = check(
        &store("url = \"redis://127.0.0.1:6379/0\"\npassword_env = \"P\""),
        &[("P", "hunter2")],
    );
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
    // A cluster over TLS, its seeds listed.
    let cluster = "url = \"rediss://a:7000\"\ncluster = true\nnodes = [\"rediss://b:7001\"]\npassword_env = \"P\"";
    let (code, out, err, _) = check(&store(cluster), &[("P", "hunter2")]);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}");
    // An in-flight cap alone is never shared.
    let cap = "\n[routes.rate_limit]\nrequests_per_minute = 0\nmax_concurrent = 4\nshared = true\n";
    let toml = format!(
        "[rate_limit_store]\nurl = \"redis://x\"\n\n{}{cap}",
        one_route("http://h", "")
    );
    let (code, _, err, _) = check(&toml, &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rate_limit.shared: shared = true needs requests_per_minute"),
        "{err}"
    );
    // A shared token limit needs the store too, with its line and column.
    let tokens = "\n[routes.token_limit]\ntokens_per_minute = 1000\nshared = true\n";
    let (code, _, err, file) = check(&format!("{}{tokens}", one_route("http://h", "")), &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{file}:"))
            && err.contains(
                "routes[0].token_limit.shared: shared = true needs a [rate_limit_store] table"
            ),
        "{err}"
    );
}

/// The Kubernetes example for many replicas passes `sluice check` as shipped.
#[test]
fn the_replicas_example_config_passes_check() {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes/replicas/configmap.yaml"),
    )
    .unwrap();
    // The block scalar under `sluice.toml: |`, its indent removed.
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_end().ends_with("sluice.toml: |"));
    lines.next().expect("a sluice.toml: | block");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || indent(l) >= 4)
        .collect();
    let toml: String = body
        .iter()
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    assert!(
        toml.contains("[rate_limit_store]") && toml.contains("shared = true"),
        "{toml}"
    );
    let env = [
        ("OPENAI_API_KEY", "sk-test"),
        ("SLUICE_REDIS_PASSWORD", "hunter2"),
    ];
    let (code, out, err, _) = check(&toml, &env);
    assert_eq!((code, out.trim()), (0, "ok"), "{err}\n{toml}");
}

#[test]
fn telemetry_is_checked_with_its_place_and_its_headers_never_shown() {
    let with = |lines: &str| format!("{}\n[telemetry.otlp]\n{lines}\n", one_route("http://h", ""));
    for (lines, want) in [
        (
            "endpoint = \"otel:4318\"",
            ":10:12: telemetry.otlp.endpoint: not an http:// or https:// URL",
        ),
        (
            "endpoint = \"http://c:4318\"\nsample_ratio = 1.5",
            ":11:16: telemetry.otlp.sample_ratio: must be between 0 and 1",
        ),
        (
            "endpoint = \"http://c:4318\"\nservice_name = \" \"",
            "telemetry.otlp.service_name: must not be empty",
        ),
        (
            "endpoint = \"http://c:4318\"\nheaders = { \"bad name\" = \"hunter2\" }",
            "telemetry.otlp.headers: \"bad name\" is not a valid header name",
        ),
        (
            "endpoint = \"http://c:4318\"\ntimeout = \"0s\"",
            "telemetry.otlp.timeout: must be above 0",
        ),
        (
            "endpoint = \"http://c:4318\"\nca_file = \"ca.pem\"",
            "telemetry.otlp.ca_file: a CA is for an https:// endpoint",
        ),
        (
            "endpoint = \"https://c:4318\"\nca_file = \"nope.pem\"",
            "nope.pem: cannot read PEM certificates",
        ),
        (
            "endpoint = \"https://user:hunter2@c:4318\"",
            "telemetry.otlp.endpoint: a user or password in the url is not supported",
        ),
        (
            "endpoint = \"http://c:4318\"\nsampling = 1",
            "telemetry.otlp.sampling: unknown field `sampling`",
        ),
    ] {
        let (code, _, err, _) = check(&with(lines), &[]);
        assert_eq!(code, 1, "{lines}");
        assert!(err.contains(want), "{lines}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    for lines in [
        "endpoint = \"\"",
        "endpoint = \"http://127.0.0.1:4318\"\nheaders = { authorization = \"Bearer hunter2\" }",
        "endpoint = \"https://collector.example/otlp/v1/traces\"\nsample_ratio = 0.1\npropagate_upstream = false",
    ] {
        let (code, out, err, _) = check(&with(lines), &[]);
        assert_eq!((code, out.trim()), (0, "ok"), "{lines}: {err}");
        assert!(!out.contains("hunter2") && !err.contains("hunter2"));
    }
}
