//! The official `openai` SDKs, Python and Node, through sluice to a mock:
//! chat, streamed chat, embeddings, models, and a 404 from a missing route.
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
    assert!(
        program.exists() || program.components().count() == 1,
        "{} is missing: run scripts/install-sdks.sh (the README's test command does)",
        program.display()
    );
    let mock = openai::start().await;
    let toml = one_route(&mock.url(), "api_key_env = \"UP_KEY\"");
    let toml = toml.replace("name = \"all\"", "name = \"openai\"\npath_prefix = \"/v1\"");
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
