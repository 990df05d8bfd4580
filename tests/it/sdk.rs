//! The official `openai` SDKs, Python and Node, through sluice to a mock:
//! chat, streamed chat, embeddings, models, and a 404 from a missing route;
//! and usage injection (SPEC §10) as the SDKs see it.
//! `scripts/install-sdks.sh` installs them (the README's test command runs it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs an SDK script against a fresh mock and sluice; fails with its output.
async fn run_script(program: PathBuf, script: &str) {
    run_script_on(program, script, false).await
}

/// With `aliases`, the route routes by model: the client sends the aliases
/// `fast` and `embed`, sluice rewrites them to the mock's names and answers
/// `models.list()` itself.
async fn run_script_on(program: PathBuf, script: &str, aliases: bool) {
    let mock = openai::start().await;
    let toml = openai_toml(&mock, "");
    let toml = if aliases {
        let models = "[models.fast]\ndeployments = [{ upstream = \"up\", model = \"mock-model\" }]\n\
                      [models.embed]\ndeployments = [{ upstream = \"up\", model = \"mock-embed\" }]\n\n";
        format!(
            "{models}{}",
            toml.replace(
                "[[routes]]",
                "[[routes]]\nmodel_routing = true\nmodels = [\"fast\", \"embed\"]"
            )
        )
    } else {
        toml
    };
    let proxy = Sidecar::start(&toml, &[("UP_KEY", openai::UPSTREAM_KEY)]).await;
    let mut command = tokio::process::Command::new(&program);
    if aliases {
        command
            .env("SLUICE_CHAT_MODEL", "fast")
            .env("SLUICE_EMBED_MODEL", "embed")
            .env("SLUICE_MODEL_IDS", "fast,embed");
    }
    run_against(command, &program, script, &proxy).await;
    // Every call reached the mock with the injected key (401s would have failed above).
    let paths: Vec<String> = mock
        .seen()
        .iter()
        .map(|s| s.uri.path().to_owned())
        .collect();
    let mut expected = vec![
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
    ];
    if !aliases {
        expected.push("/v1/models");
    }
    assert_eq!(paths, expected);
}

/// One route `openai` under `/v1` to the mock (upstream `up`, with these
/// extra lines), whose key sluice injects from `UP_KEY`.
fn openai_toml(mock: &Mock, upstream_extra: &str) -> String {
    let extra = format!("api_key_env = \"UP_KEY\"\n{upstream_extra}");
    let toml = one_route(&mock.url(), &extra);
    toml.replace("name = \"all\"", "name = \"openai\"\npath_prefix = \"/v1\"")
}

/// Runs `script` under `command` (`program`) against `proxy`; fails with
/// its output unless it exits 0 and prints `all ok`.
async fn run_against(
    mut command: tokio::process::Command,
    program: &Path,
    script: &str,
    proxy: &Sidecar,
) {
    assert!(
        program.exists() || program.components().count() == 1,
        "{} is missing: run scripts/install-sdks.sh (the README's test command does)",
        program.display()
    );
    let child = command
        .arg(repo().join(script))
        .env("SLUICE_BASE_URL", proxy.url("/v1"))
        .env("SLUICE_UNROUTED_BASE_URL", proxy.url("/nothing-here/v1"))
        .current_dir(repo())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), child)
        .await
        .expect("SDK script finished within 120 s")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// With `[routes.usage] inject = "always"`, runs a `usage` script (each
/// scenario sends its name as the user message), then checks what the
/// upstream received and the tokens sluice counted. Keep-alive comments
/// fill the mock's 10 ms pauses between events: the script checks that
/// some came and that the SDK parsed the stream around them.
async fn run_usage_script(program: PathBuf, script: &str) {
    let (mock, bodies) = openai::start_recording().await;
    // A custom upstream may not be sent `include_usage` unless it says so.
    let toml = openai_toml(&mock, "inject_usage = true")
        + "\n[routes.usage]\ninject = \"always\"\n[routes.sse]\nkeepalive = \"2ms\"\n";
    let proxy = Sidecar::start(&toml, &[("UP_KEY", openai::UPSTREAM_KEY)]).await;
    let mut command = tokio::process::Command::new(&program);
    command.env("SLUICE_KEEPALIVE", "1");
    run_against(command, &program, script, &proxy).await;
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 4, "{bodies:#?}");
    let sent = |name: &str| -> serde_json::Value {
        let found: Vec<_> = bodies
            .iter()
            .filter(|b| b["messages"][0]["content"] == name)
            .collect();
        assert_eq!(found.len(), 1, "one request for {name}: {bodies:#?}");
        found[0].clone()
    };
    // Injected when the client did not ask (absent, false); untouched when it did.
    for name in ["injected", "asked", "asked_false"] {
        let body = sent(name);
        assert_eq!(body["stream"], true, "{name}: {body}");
        assert_eq!(
            body["stream_options"]["include_usage"], true,
            "{name}: {body}"
        );
    }
    let body = sent("not_streamed");
    assert_eq!(body["stream"], false, "{body}");
    assert!(body.get("stream_options").is_none(), "{body}");
    // Three streams of 11 + 5 tokens and one completion of 1 + 6, counted
    // once each response has ended (give the last one a moment).
    let input = r#"sluice_tokens_total{route="openai",upstream="up",model="-",type="input"}"#;
    let output = r#"sluice_tokens_total{route="openai",upstream="up",model="-",type="output"}"#;
    let mut scrape = String::new();
    for _ in 0..100 {
        scrape = String::from_utf8_lossy(&get(&proxy.admin_url("/metrics")).await.1).into_owned();
        if metric(&scrape, input) == Some(34.0) && metric(&scrape, output) == Some(21.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&scrape, input), Some(34.0), "{input}:\n{scrape}");
    assert_eq!(metric(&scrape, output), Some(21.0), "{output}:\n{scrape}");
    assert!(
        family_sum(&scrape, "sluice_usage_injected_total") >= 1.0,
        "sluice_usage_injected_total missing or 0:\n{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_openai_sdk_end_to_end() {
    run_script(repo().join(".venv/bin/python"), "tests/sdk/python/e2e.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_openai_sdk_end_to_end() {
    assert!(
        repo().join("tests/sdk/node/node_modules/openai").exists(),
        "the openai npm package is missing: run scripts/install-sdks.sh"
    );
    run_script(PathBuf::from("node"), "tests/sdk/node/e2e.mjs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_openai_sdk_through_model_aliases() {
    run_script_on(
        repo().join(".venv/bin/python"),
        "tests/sdk/python/e2e.py",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_openai_sdk_through_model_aliases() {
    assert!(
        repo().join("tests/sdk/node/node_modules/openai").exists(),
        "the openai npm package is missing: run scripts/install-sdks.sh"
    );
    run_script_on(PathBuf::from("node"), "tests/sdk/node/e2e.mjs", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_streams_with_usage_injected() {
    run_usage_script(repo().join(".venv/bin/python"), "tests/sdk/python/usage.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_streams_with_usage_injected() {
    assert!(
        repo().join("tests/sdk/node/node_modules/openai").exists(),
        "the openai npm package is missing: run scripts/install-sdks.sh"
    );
    run_usage_script(PathBuf::from("node"), "tests/sdk/node/usage.mjs").await;
}

/// Runs one scenario of tests/sdk/python/resilience.py against `proxy`.
pub async fn python_scenario(name: &str, proxy: &Sidecar) {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-sdks.sh",
        python.display()
    );
    let child = tokio::process::Command::new(python)
        .arg(repo().join("tests/sdk/python/resilience.py"))
        .arg(name)
        .env("SLUICE_BASE_URL", proxy.url("/v1"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("scenario finished within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("ok {name}")),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
