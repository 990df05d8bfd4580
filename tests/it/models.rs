//! Models, deployments and fallback chains (SPEC §7, §8): routing by the
//! body's top-level `model`, the rewrite of `model` per deployment, the
//! attempt plan across deployments and fallbacks, the headers and the
//! access line that say what happened, `GET /v1/models`, presets' paths.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::support::mock::{full, read_body};
use crate::support::*;

/// What one mock upstream saw: each request's path and query, headers and body.
pub(crate) type Log = Arc<Mutex<Vec<(String, http::HeaderMap, Bytes)>>>;

/// A mock upstream that records every request and answers with `answer`
/// by the request's number (from 0; the last repeats).
pub(crate) async fn upstream(answers: Vec<(u16, &'static str, &'static str)>) -> (Mock, Log) {
    let log: Log = Arc::default();
    let (l, n) = (log.clone(), Arc::new(AtomicUsize::new(0)));
    let mock = Mock::start(move |req: Request<Incoming>| {
        let (l, n) = (l.clone(), n.clone());
        let answers = answers.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = read_body(body).await.unwrap_or_default();
            let pq = parts.uri.path_and_query().unwrap().to_string();
            l.lock().unwrap().push((pq, parts.headers, body));
            let i = n.fetch_add(1, SeqCst).min(answers.len() - 1);
            let (status, extra, body) = answers[i];
            let mut res = Response::builder()
                .status(status)
                .header("content-type", "application/json");
            for (k, v) in extra.lines().filter_map(|l| l.split_once(": ")) {
                res = res.header(k, v);
            }
            res.body(full(body)).unwrap()
        }
    })
    .await;
    (mock, log)
}

const OK: (u16, &str, &str) = (200, "", r#"{"id":"ok"}"#);

async fn post(sidecar_url: &str, body: impl Into<Bytes>) -> (Response<()>, Bytes) {
    post_with(&client(), sidecar_url, body).await
}

async fn post_with(
    client: &TestClient,
    sidecar_url: &str,
    body: impl Into<Bytes>,
) -> (Response<()>, Bytes) {
    let req = Request::post(sidecar_url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    collect(send(client, req).await).await
}

pub(crate) fn chat(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

/// A config with upstreams `a`, `b` (and `c`) at these URLs, the given
/// `[models]` tables, and one model-routed route on /v1.
pub(crate) fn config(urls: &[&str], models: &str, route: &str) -> String {
    let mut out = String::new();
    for (name, url) in ["a", "b", "c"].iter().zip(urls) {
        out.push_str(&format!(
            "[upstreams.{name}]\nurl = \"{url}\"\napi_key_env = \"KEY_{}\"\n\n",
            name.to_uppercase()
        ));
    }
    out.push_str(models);
    out.push_str(&format!(
        "\n[[routes]]\nname = \"llm\"\npath_prefix = \"/v1\"\nmodel_routing = true\n{route}\n"
    ));
    out
}

pub(crate) const KEYS: &[(&str, &str)] = &[("KEY_A", "sk-a"), ("KEY_B", "sk-b"), ("KEY_C", "sk-c")];

#[tokio::test]
async fn the_model_is_found_first_or_after_a_large_prompt_and_rewritten_per_deployment() {
    let (mock, log) = upstream(vec![OK]).await;
    let models = "[models.fast]\ndeployments = [{ upstream = \"a\", model = \"gpt-4.1-mini\" }]\n";
    let sidecar = Sidecar::start(&config(&[&mock.url()], models, ""), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    // openai-python writes messages before model: a 1 MiB prompt first.
    let prompt = "x".repeat(1 << 20);
    let last = format!(r#"{{"messages":[{{"role":"user","content":"{prompt}"}}],"model":"fast"}}"#);
    let cases = [
        (client(), chat("fast")),
        (client(), last.clone()),
        (h2c_client(), chat("fast")),
        (h2c_client(), last.clone()),
    ];
    for (client, body) in cases {
        let (head, _) = post_with(&client, &url, body.clone()).await;
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["x-sluice-upstream"], "a");
        assert_eq!(head.headers()["x-sluice-model"], "gpt-4.1-mini");
        assert!(head.headers().get("x-sluice-fallbacks").is_none());
        let (_, headers, sent) = log.lock().unwrap().pop().unwrap();
        // Every byte but the model's value arrives as the client sent it.
        let expected = body.replace(r#""model":"fast""#, r#""model":"gpt-4.1-mini""#);
        assert_eq!(sent.len(), expected.len());
        assert!(
            sent == expected.as_bytes(),
            "the body changed beyond the model"
        );
        if let Some(len) = headers.get("content-length") {
            assert_eq!(len, &expected.len().to_string());
        }
        assert_eq!(headers["authorization"], "Bearer sk-a");
    }
}

#[tokio::test]
async fn a_body_without_a_usable_model_is_refused_before_anything_is_sent() {
    let (mock, log) = upstream(vec![OK]).await;
    let models = "[models.fast]\ndeployments = [{ upstream = \"a\" }]\n[models.other]\ndeployments = [{ upstream = \"a\" }]\n";
    let route = "models = [\"fast\"]\n";
    let sidecar = Sidecar::start(&config(&[&mock.url()], models, route), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let cases: &[(&str, u16, &str)] = &[
        // A model only inside messages or a tool schema does not count.
        (
            r#"{"messages":[{"role":"user","model":"fast"}]}"#,
            400,
            "model_required",
        ),
        (
            r#"{"tools":[{"model":"fast"}],"x":"\"model\":\"fast\""}"#,
            400,
            "model_required",
        ),
        (r#"{"model":5,"messages":[]}"#, 400, "model_required"),
        (
            r#"{"model":"fast","messages":[],"model":"other"}"#,
            400,
            "ambiguous_request_body",
        ),
        (r#"["model","fast"]"#, 400, "invalid_json_body"),
        // A raw control byte in the name: not a JSON string.
        (
            "{\"model\":\"fa\tst\",\"messages\":[]}",
            400,
            "model_required",
        ),
        (r#"{"model":"nope","messages":[]}"#, 404, "model_not_found"),
        // Defined, but not allowed on this route.
        (r#"{"model":"other","messages":[]}"#, 404, "model_not_found"),
    ];
    for (body, status, code) in cases {
        let (head, got) = post(&url, *body).await;
        assert_sluice_error(&head, &got, *status, code);
    }
    // Not JSON, and the route has no upstream of its own for it.
    let req = Request::post(&url)
        .header("content-type", "multipart/form-data; boundary=x")
        .body(Full::new(Bytes::from_static(b"--x--")))
        .unwrap();
    let (head, got) = collect(send(&client(), req).await).await;
    assert_sluice_error(&head, &got, 400, "model_routing_unsupported_body");
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(Full::new(Bytes::from_static(b"\x1f\x8b")))
        .unwrap();
    let (head, got) = collect(send(&client(), req).await).await;
    assert_sluice_error(&head, &got, 415, "unsupported_content_encoding");
    assert!(
        log.lock().unwrap().is_empty(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn other_requests_and_unknown_models_pass_through_to_the_routes_upstream() {
    let (models_up, models_log) = upstream(vec![OK]).await;
    let (direct, direct_log) = upstream(vec![OK]).await;
    let models = "[models.fast]\ndeployments = [{ upstream = \"a\", model = \"m1\" }]\n";
    let route = "upstream = \"b\"\nunknown_model = \"passthrough\"\n";
    let toml = config(&[&models_up.url(), &direct.url()], models, route);
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let (head, _) = post(&url, chat("gpt-5")).await;
    assert_eq!(head.status(), 200);
    let (head, _) = get(&sidecar.url("/v1/files")).await;
    assert_eq!(head.status(), 200);
    let direct_seen = direct_log.lock().unwrap().clone();
    assert_eq!(direct_seen.len(), 2);
    // The body went untouched, with the route's upstream's key.
    assert_eq!(direct_seen[0].2, chat("gpt-5").as_bytes());
    assert_eq!(direct_seen[0].1["authorization"], "Bearer sk-b");
    assert!(models_log.lock().unwrap().is_empty());
    let (_, metrics) = get(&sidecar.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        r#"sluice_model_requests_total{route="llm",model="-",result="unknown"} 1"#,
        r#"sluice_model_requests_total{route="llm",model="-",result="passthrough"} 1"#,
        r#"sluice_deployment_in_flight{upstream="a",model="m1"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn two_deployments_fail_then_the_fallback_answers_without_waiting_between_upstreams() {
    // Each 503 asks for a 5 s wait: honoured before the same upstream
    // again, never before an untried one.
    let busy = (503, "retry-after: 5", r#"{"error":{"message":"busy"}}"#);
    let (a, a_log) = upstream(vec![busy]).await;
    let (b, b_log) = upstream(vec![busy]).await;
    let (c, c_log) = upstream(vec![OK]).await;
    let models = "[models.big]\ndeployments = [{ upstream = \"a\", model = \"big-a\" }, { upstream = \"b\", model = \"big-b\" }]\nfallbacks = [\"small\"]\n\n[models.small]\ndeployments = [{ upstream = \"c\", model = \"small-c\" }]\n";
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{}",
        config(&[&a.url(), &b.url(), &c.url()], models, "")
    );
    let mut proxy = Process::start(&toml, KEYS).await;
    let started = Instant::now();
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "fallback-1")
        .body(Full::new(Bytes::from(chat("big"))))
        .unwrap();
    let (head, body) = collect(send(&client(), req).await).await;
    let took = started.elapsed();
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        took < Duration::from_secs(3),
        "waited {took:?} between untried upstreams"
    );
    assert_eq!(head.headers()["x-sluice-attempts"], "3");
    assert_eq!(head.headers()["x-sluice-fallbacks"], "1");
    assert_eq!(head.headers()["x-sluice-upstream"], "c");
    assert_eq!(head.headers()["x-sluice-model"], "small-c");
    assert_eq!(head.headers()["x-should-retry"], "false");
    // Each deployment got its own model name.
    let model_of = |log: &Log| {
        let body = log.lock().unwrap()[0].2.clone();
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["model"].clone()
    };
    assert_eq!(model_of(&a_log), "big-a");
    assert_eq!(model_of(&b_log), "big-b");
    assert_eq!(model_of(&c_log), "small-c");
    let admin = proxy.admin.expect("admin listener");
    let (_, metrics) = get(&format!("http://{admin}/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        r#"sluice_model_requests_total{route="llm",model="big",result="routed"} 1"#,
        r#"sluice_fallbacks_total{route="llm",from_model="big",to_model="small",reason="status_5xx"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    proxy.stop().await;
    let out = proxy.output();
    let line = out
        .lines()
        .find(|l| l.contains("fallback-1") && l.contains("sluice::access"))
        .unwrap_or_else(|| panic!("no access line in:\n{out}"));
    let trail = "trail=\"a/big-a:503,b/big-b:503,c/small-c:200\"";
    let trail_other = "trail=\"b/big-b:503,a/big-a:503,c/small-c:200\"";
    assert!(line.contains(trail) || line.contains(trail_other), "{line}");
    for field in [
        "model=\"big\"",
        "deployment=\"c/small-c\"",
        "fallbacks=1",
        "upstream=\"c\"",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_same_deployment_again_waits_its_backoff() {
    // One deployment, two attempts: the second goes to the same upstream
    // and waits for its hint.
    let busy = (503, "retry-after: 2", "{}");
    let (a, a_log) = upstream(vec![busy, OK]).await;
    let models = "[models.one]\ndeployments = [{ upstream = \"a\" }]\n";
    let sidecar = Sidecar::start(&config(&[&a.url()], models, ""), KEYS).await;
    let started = tokio::time::Instant::now();
    let (head, _) = post(&sidecar.url("/v1/chat/completions"), chat("one")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-attempts"], "2");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a_log.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_lost_key_moves_to_the_next_key_and_every_refused_key_is_sluices_502() {
    let quota = (
        429,
        "",
        r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
    );
    let (a, _) = upstream(vec![quota]).await;
    let (b, b_log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\", weight = 1000 }, { upstream = \"b\" }]\nbalance = \"priority\"\n";
    // Priority: a first (both priority 0, a's weight dominates).
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, ""), KEYS).await;
    let started = Instant::now();
    for _ in 0..3 {
        let (head, _) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
        assert_eq!(head.status(), 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no backoff before another key"
    );
    assert_eq!(b_log.lock().unwrap().len(), 3);

    let denied = (
        401,
        "",
        r#"{"error":{"message":"Incorrect API key provided: sk-a***"}}"#,
    );
    let (a, _) = upstream(vec![denied]).await;
    let (b, _) = upstream(vec![denied]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }, { upstream = \"b\" }]\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, ""), KEYS).await;
    let (head, body) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
    assert_sluice_error(&head, &body, 502, "upstream_auth_failed");
    assert!(
        !String::from_utf8_lossy(&body).contains("sk-a"),
        "the provider's body is not passed on"
    );
    assert_eq!(head.headers()["x-sluice-attempts"], "2");
}

#[tokio::test]
async fn a_client_error_is_neither_retried_nor_failed_over() {
    let context = (
        400,
        "",
        r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#,
    );
    let (a, a_log) = upstream(vec![context]).await;
    let (c, c_log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\nfallbacks = [\"f\"]\n[models.f]\ndeployments = [{ upstream = \"b\" }]\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &c.url()], models, ""), KEYS).await;
    let (head, body) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
    assert_eq!(head.status(), 400);
    assert!(String::from_utf8_lossy(&body).contains("context_length_exceeded"));
    assert_eq!(a_log.lock().unwrap().len(), 1);
    assert!(c_log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_route_lists_the_models_it_allows() {
    let (mock, log) = upstream(vec![OK]).await;
    let models = "[models.fast]\ndeployments = [{ upstream = \"a\" }]\n[models.smart]\ndeployments = [{ upstream = \"a\" }]\n[models.hidden]\ndeployments = [{ upstream = \"a\" }]\n";
    let route = "models = [\"smart\", \"fast\"]\n";
    let sidecar = Sidecar::start(&config(&[&mock.url()], models, route), KEYS).await;
    let (head, body) = get(&sidecar.url("/v1/models")).await;
    assert_eq!(head.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smart", "fast"]);
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn azure_and_gemini_presets_map_the_path() {
    let (mock, log) = upstream(vec![OK]).await;
    let toml = format!(
        "[upstreams.az]\npreset = \"azure\"\nurl = \"{url}\"\napi_key_env = \"KEY_A\"\nazure_api = \"deployments\"\napi_version = \"2024-10-21\"\n\n\
         [upstreams.az1]\npreset = \"azure\"\nurl = \"{url}/\"\napi_key_env = \"KEY_A\"\n\n\
         [models.dep]\ndeployments = [{{ upstream = \"az\", model = \"my-gpt\" }}]\n\
         [models.v1]\ndeployments = [{{ upstream = \"az1\", model = \"gpt-4.1\" }}]\n\n\
         [[routes]]\nname = \"llm\"\npath_prefix = \"/v1\"\nmodel_routing = true\n",
        url = mock.url()
    );
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let (head, _) = post(
        &sidecar.url("/v1/chat/completions?api-version=old&x=1"),
        chat("dep"),
    )
    .await;
    assert_eq!(head.status(), 200);
    let (head, _) = post(&sidecar.url("/v1/chat/completions"), chat("v1")).await;
    assert_eq!(head.status(), 200);
    let seen = log.lock().unwrap().clone();
    assert_eq!(
        seen[0].0,
        "/openai/deployments/my-gpt/chat/completions?x=1&api-version=2024-10-21"
    );
    assert_eq!(seen[0].1["api-key"], "sk-a");
    assert!(seen[0].1.get("authorization").is_none());
    assert_eq!(seen[1].0, "/openai/v1/chat/completions");
    let model: serde_json::Value = serde_json::from_slice(&seen[1].2).unwrap();
    assert_eq!(model["model"], "gpt-4.1");
}

#[tokio::test]
async fn an_anthropic_route_answers_sluices_errors_in_anthropics_shape() {
    let (mock, log) = upstream(vec![OK]).await;
    let toml = format!(
        "[upstreams.claude]\npreset = \"anthropic\"\nurl = \"{}\"\napi_key_env = \"KEY_A\"\n\n\
         [models.sonnet]\ndeployments = [{{ upstream = \"claude\", model = \"claude-sonnet-4-5\" }}]\n\n\
         [[routes]]\nname = \"messages\"\npath_prefix = \"/v1\"\nmodel_routing = true\n",
        mock.url()
    );
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let url = sidecar.url("/v1/messages");
    let (head, body) = post(&url, chat("opus")).await;
    assert_eq!(head.status(), 404);
    assert_eq!(head.headers()["x-sluice-error"], "model_not_found");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("sluice: "));
    let (head, _) = post(&url, chat("sonnet")).await;
    assert_eq!(head.status(), 200);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1["x-api-key"], "sk-a");
    assert_eq!(seen[0].1["anthropic-version"], "2023-06-01");
    assert!(seen[0].1.get("authorization").is_none());
}

#[tokio::test]
async fn a_streamed_body_with_the_model_first_reaches_the_upstream_before_it_ends() {
    // The upstream signals once it has read the first part of the body; the
    // client sends the rest only then. Bodies over retry_buffer stream.
    let (got_start, started) = tokio::sync::oneshot::channel::<()>();
    let got_start = Arc::new(Mutex::new(Some(got_start)));
    let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
    let (g, sn) = (got_start.clone(), seen.clone());
    let mock = Mock::start(move |req: Request<Incoming>| {
        let (g, sn) = (g.clone(), sn.clone());
        async move {
            use http_body_util::BodyExt;
            let mut body = req.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    let mut all = sn.lock().unwrap();
                    all.extend_from_slice(d);
                    if all.len() >= 2048 {
                        if let Some(tx) = g.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            json(200, r#"{"id":"ok"}"#)
        }
    })
    .await;
    let models = "[models.fast]\ndeployments = [{ upstream = \"a\", model = \"gpt-4.1-nano\" }]\n";
    let toml = format!(
        "[server]\nretry_buffer = \"1KiB\"\n\n{}",
        config(&[&mock.url()], models, "")
    );
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let (tx, body) = channel();
    let req = Request::post(sidecar.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<MockBody>();
    let res = tokio::spawn(async move { client.request(req).await.expect("request failed") });
    let first = format!(
        r#"{{"model":"fast","messages":[{{"role":"user","content":"{}"#,
        "a".repeat(4096)
    );
    tx.send(first.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("the upstream got the start of the body before the client finished")
        .unwrap();
    let rest = r#""}]}"#;
    tx.send(rest).await.unwrap();
    drop(tx);
    let (head, _) = collect(res.await.unwrap()).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-model"], "gpt-4.1-nano");
    let expected =
        format!("{first}{rest}").replace(r#""model":"fast""#, r#""model":"gpt-4.1-nano""#);
    assert!(
        *seen.lock().unwrap() == expected.as_bytes(),
        "the streamed body changed beyond the model"
    );
}

#[tokio::test(start_paused = true)]
async fn five_failures_eject_a_deployment_and_one_probe_tries_it_after_the_ejection() {
    let busy = (503, "", r#"{"error":{"message":"busy"}}"#);
    let (a, a_log) = upstream(vec![busy]).await;
    let (b, b_log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }, { upstream = \"b\", priority = 1 }]\nbalance = \"priority\"\n";
    let route = "[routes.retry]\nattempts = 1\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, route), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let upstream_of = |head: &Response<()>| {
        head.headers()["x-sluice-upstream"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    for _ in 0..5 {
        let (head, _) = post(&url, chat("m")).await;
        assert_eq!(
            (head.status().as_u16(), upstream_of(&head)),
            (503, "a".into())
        );
    }
    // Ejected for 10 s: the lower priority takes everything meanwhile.
    for _ in 0..3 {
        let (head, _) = post(&url, chat("m")).await;
        assert_eq!(
            (head.status().as_u16(), upstream_of(&head)),
            (200, "b".into())
        );
    }
    tokio::time::advance(Duration::from_secs(10)).await;
    // One probe, which fails: ejected again, now for 20 s.
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(upstream_of(&head), "a");
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(upstream_of(&head), "b");
    tokio::time::advance(Duration::from_secs(19)).await;
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(upstream_of(&head), "b");
    assert_eq!(a_log.lock().unwrap().len(), 6);
    assert_eq!(b_log.lock().unwrap().len(), 5);
    let (_, metrics) = get(&sidecar.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        r#"sluice_deployment_ejections_total{upstream="a",model="m",reason="failures"} 1"#,
        r#"sluice_deployment_ejections_total{upstream="a",model="m",reason="probe_failed"} 1"#,
        r#"sluice_deployment_state{upstream="a",model="m",state="ejected"} 1"#,
        r#"sluice_deployment_state{upstream="b",model="m",state="healthy"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn every_deployment_ejected_with_fail_answers_503_with_retry_after() {
    let busy = (503, "", "{}");
    let (a, a_log) = upstream(vec![busy]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }, { upstream = \"a\", model = \"m2\" }]\non_all_ejected = \"fail\"\n";
    let toml = config(&[&a.url()], models, "[routes.retry]\nattempts = 1\n")
        .replace("[upstreams.a]\n", "[upstreams.a]\nhealth = { consecutive_failures = 1, base_ejection = \"1m\", max_ejection = \"1m\" }\n");
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    for _ in 0..2 {
        let (head, _) = post(&url, chat("m")).await;
        assert_eq!(head.status(), 503);
        assert!(
            head.headers().get("x-sluice-error").is_none(),
            "the upstream's own 503"
        );
    }
    let (head, body) = post(&url, chat("m")).await;
    assert_sluice_error(&head, &body, 503, "no_healthy_deployment");
    let wait: u64 = head.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(a_log.lock().unwrap().len(), 2);
}

/// An upstream whose every answer is 200 SSE headers at once, then
/// `events` after `delay`, then the end.
async fn sse_after(delay: Duration, events: &'static [&'static str]) -> Mock {
    Mock::start(move |_req: Request<Incoming>| async move {
        let (tx, body) = channel();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for e in events {
                if tx.send(*e).await.is_err() {
                    return;
                }
            }
        });
        sse(body)
    })
    .await
}

/// An upstream whose every answer is a 200 SSE stream that sends `events`
/// and then breaks off (`reset`) or ends.
async fn sse_upstream(events: &'static [&'static str], reset: bool) -> (Mock, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let mock = Mock::start(move |_req: Request<Incoming>| {
        h.fetch_add(1, SeqCst);
        async move {
            let (tx, body) = channel();
            tokio::spawn(async move {
                for e in events {
                    if tx.send(*e).await.is_err() {
                        return;
                    }
                }
                if reset {
                    let _ = tx.fail("upstream broke").await;
                }
            });
            sse(body)
        }
    })
    .await;
    (mock, hits)
}

#[tokio::test]
async fn first_event_commit_fails_over_invisibly_before_the_first_event() {
    const GOOD: &[&str] = &[
        "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
        "data: [DONE]\n\n",
    ];
    let cases: &[(&[&str], bool, &str)] = &[
        // Headers, then a reset before any event.
        (&[], true, "reset"),
        // A comment is not an event: it does not commit.
        (&[": ping\n\n"], true, "reset"),
        // An error object as the first event.
        (
            &["data: {\"error\":{\"message\":\"overloaded\",\"code\":\"server_error\"}}\n\n"],
            false,
            "stream-error",
        ),
    ];
    for (events, reset, word) in cases {
        let (a, a_hits) = sse_upstream(events, *reset).await;
        let (b, b_hits) = sse_upstream(GOOD, false).await;
        // One attempt on the primary: the next goes down the chain.
        let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\nattempts = 1\nfallbacks = [\"f\"]\n[models.f]\ndeployments = [{ upstream = \"b\" }]\n";
        let route = "[routes.retry]\ncommit = \"first-event\"\n";
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\n{}",
            config(&[&a.url(), &b.url()], models, route)
        );
        let mut proxy = Process::start(&toml, KEYS).await;
        let req = Request::post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-request-id", "commit-1")
            .body(Full::new(Bytes::from(chat("m"))))
            .unwrap();
        let (head, body) = collect(send(&client(), req).await).await;
        assert_eq!(head.status(), 200, "{word}");
        assert_eq!(head.headers()["x-sluice-upstream"], "b", "{word}");
        assert_eq!(head.headers()["x-sluice-fallbacks"], "1", "{word}");
        // One clean stream, the fallback's alone.
        assert_eq!(body, GOOD.concat().as_bytes(), "{word}");
        assert_eq!((a_hits.load(SeqCst), b_hits.load(SeqCst)), (1, 1), "{word}");
        proxy.stop().await;
        let out = proxy.output();
        let trail = format!("trail=\"a/m:{word},b/f:200\"");
        assert!(
            out.lines()
                .any(|l| l.contains("commit-1") && l.contains(&trail)),
            "{trail} missing:\n{out}"
        );
    }
}

#[tokio::test]
async fn after_the_first_event_the_stream_is_the_clients() {
    // Committed: a later reset ends the client's stream with the SSE error
    // event, and nothing is tried again.
    const EVENTS: &[&str] = &["data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"];
    let (a, a_hits) = sse_upstream(EVENTS, true).await;
    let (b, b_hits) = sse_upstream(EVENTS, false).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\nfallbacks = [\"f\"]\n[models.f]\ndeployments = [{ upstream = \"b\" }]\n";
    let route = "[routes.retry]\ncommit = \"first-event\"\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, route), KEYS).await;
    let (head, body) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-upstream"], "a");
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with(EVENTS[0]), "{text}");
    assert!(text.contains("upstream_reset"), "{text}");
    assert_eq!((a_hits.load(SeqCst), b_hits.load(SeqCst)), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn a_silent_model_falls_back_after_one_first_byte() {
    let silent = Mock::start(|_req: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        json(200, "{}")
    })
    .await;
    let (b, b_log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\nfallbacks = [\"f\"]\n[models.f]\ndeployments = [{ upstream = \"b\" }]\n";
    let route = "[routes.timeouts]\nfirst_byte = \"2s\"\n";
    let sidecar = Sidecar::start(&config(&[&silent.url(), &b.url()], models, route), KEYS).await;
    let started = tokio::time::Instant::now();
    let (head, _) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
    let took = started.elapsed();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-upstream"], "b");
    // timeout is not in retry_on: one attempt on the primary, then the fallback.
    assert_eq!(head.headers()["x-sluice-attempts"], "2");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(b_log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_empty_budget_stops_the_plan_mid_chain() {
    let (a, _) = upstream(vec![(503, "", r#"{"error":{"message":"busy"}}"#)]).await;
    let (b, b_log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\nfallbacks = [\"f\"]\n[models.f]\ndeployments = [{ upstream = \"b\" }]\n";
    // No floor, and a retry costs a thousand requests' deposits.
    let route = "[routes.retry]\nbudget_ratio = 0.001\nbudget_min_per_second = 0\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, route), KEYS).await;
    let (head, body) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
    assert_eq!(head.status(), 503);
    assert!(
        String::from_utf8_lossy(&body).contains("busy"),
        "the upstream's own answer"
    );
    assert_eq!(head.headers()["x-should-retry"], "false");
    assert!(b_log.lock().unwrap().is_empty(), "the chain stopped");
}

#[tokio::test]
async fn bodies_held_across_requests_are_capped_by_max_held_body() {
    let (mock, log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\n";
    let toml = format!(
        "[server]\nretry_buffer = \"1KiB\"\nmax_held_body = 1500\n\n{}",
        config(&[&mock.url()], models, "")
    );
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    // A body of unknown length, still arriving, counts as retry_buffer.
    let (tx, body) = channel();
    let req = Request::post(&url)
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<MockBody>();
    let first = tokio::spawn(async move { client.request(req).await.expect("request failed") });
    tx.send(r#"{"model":"m","messages":["#).await.unwrap();
    // Until it is in, a 600-byte body would pass 1500.
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(560)
    );
    let (mut refused, mut early) = (false, 0);
    for _ in 0..50 {
        let (head, body) = post(&url, big.clone()).await;
        if head.status() == 503 {
            assert_sluice_error(&head, &body, 503, "overloaded");
            assert_eq!(head.headers()["retry-after"], "1");
            refused = true;
            break;
        }
        // The first request had not been read yet: try again.
        early += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "a body over max_held_body was not refused");
    // The held bytes show at a scrape: the first body's retry_buffer.
    let (_, metrics) = get(&sidecar.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let line = "sluice_request_body_held_bytes 1024\n";
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    tx.send("]}").await.unwrap();
    drop(tx);
    let (head, _) = collect(first.await.unwrap()).await;
    assert_eq!(head.status(), 200);
    // Given back: the same body goes through now.
    let (head, _) = post(&url, big).await;
    assert_eq!(head.status(), 200);
    assert_eq!(log.lock().unwrap().len(), 2 + early);
    let (_, metrics) = get(&sidecar.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let line = "sluice_request_body_held_bytes 0\n";
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
}

/// The value of the series `name{labels}` in a Prometheus text scrape.
fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

// Wall clock: under the paused clock a frame that comes after a sleep can
// lose the race with the client's own timeout. Bounds only, no upper one.
#[tokio::test]
async fn time_to_first_token_runs_to_the_streams_first_bytes_not_its_headers() {
    // Headers at once, the first event 1 s later.
    let slow_start = sse_after(
        Duration::from_secs(1),
        &["data: {\"choices\":[]}\n\n", "data: [DONE]\n\n"],
    )
    .await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\", model = \"m-1\" }]\n";
    for commit in ["headers", "first-event"] {
        let route = format!("[routes.retry]\ncommit = \"{commit}\"\n");
        let toml = config(&[&slow_start.url()], models, &route)
            + "\n[[routes]]\nname = \"plain\"\npath_prefix = \"/plain\"\nupstream = \"a\"\n";
        let sidecar = Sidecar::start(&toml, KEYS).await;
        let (head, _) = post(&sidecar.url("/plain/chat/completions"), chat("m")).await;
        assert_eq!(head.status(), 200, "{commit}");
        let (head, body) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
        assert_eq!(head.status(), 200, "{commit}");
        assert!(body.ends_with(b"data: [DONE]\n\n"), "{commit}");
        let (_, metrics) = get(&sidecar.admin_url("/metrics")).await;
        let metrics = String::from_utf8_lossy(&metrics);
        let labels = r#"{route="llm",upstream="a",model="m-1"}"#;
        let ttft = format!("sluice_upstream_ttft_seconds_sum{labels}");
        let ttft = series(&metrics, &ttft).unwrap_or_else(|| panic!("{commit}:\n{metrics}"));
        assert!(ttft >= 1.0, "{commit}: {ttft}");
        let count = format!("sluice_upstream_ttft_seconds_count{labels}");
        assert_eq!(series(&metrics, &count), Some(1.0), "{commit}");
        let ttfb = r#"sluice_upstream_ttfb_seconds_sum{route="llm",upstream="a"}"#;
        let ttfb = series(&metrics, ttfb).unwrap();
        assert!(ttfb < ttft, "{commit}: headers came first, {ttfb}");
        // A plain route has no such series.
        assert!(
            !metrics.contains(r#"sluice_upstream_ttft_seconds_count{route="plain""#),
            "{metrics}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_used_up_rate_limit_takes_a_deployment_out_until_its_reset() {
    let used_up = (
        200,
        "x-ratelimit-remaining-requests: 0\nx-ratelimit-reset-requests: 20s",
        r#"{"id":"ok"}"#,
    );
    let (a, a_log) = upstream(vec![used_up, OK]).await;
    let (b, b_log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }, { upstream = \"b\", priority = 1 }]\nbalance = \"priority\"\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, ""), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let upstream_of = |head: &Response<()>| {
        head.headers()["x-sluice-upstream"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(upstream_of(&head), "a");
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(upstream_of(&head), "b", "a is saturated until its reset");
    let (_, metrics) = get(&sidecar.admin_url("/metrics")).await;
    let metrics = String::from_utf8_lossy(&metrics);
    let line = r#"sluice_deployment_state{upstream="a",model="m",state="saturated"} 1"#;
    assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    assert!(
        !metrics.contains(r#"sluice_deployment_ejections_total{upstream="a""#),
        "not a failure"
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(upstream_of(&head), "a");
    assert_eq!(
        (a_log.lock().unwrap().len(), b_log.lock().unwrap().len()),
        (2, 1)
    );
}

#[tokio::test]
async fn a_stream_broken_after_commit_counts_against_its_deployment() {
    const EVENTS: &[&str] = &["data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"];
    let (a, _) = sse_upstream(EVENTS, true).await;
    let (b, b_hits) = sse_upstream(EVENTS, false).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }, { upstream = \"b\", priority = 1 }]\nbalance = \"priority\"\n";
    let toml = config(&[&a.url(), &b.url()], models, "").replace(
        "[upstreams.a]\n",
        "[upstreams.a]\nhealth = { consecutive_failures = 1 }\n",
    );
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let (head, body) = post(&url, chat("m")).await;
    assert_eq!(head.headers()["x-sluice-upstream"], "a");
    assert!(String::from_utf8_lossy(&body).contains("upstream_reset"));
    // The access line, and so the report, comes when the body is dropped.
    let mut moved = false;
    for _ in 0..50 {
        let (head, _) = post(&url, chat("m")).await;
        if head.headers()["x-sluice-upstream"] == "b" {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        moved,
        "a stayed in rotation after breaking a committed stream"
    );
    assert!(b_hits.load(SeqCst) >= 1);
}

#[tokio::test]
async fn a_second_model_later_in_a_streamed_body_breaks_the_upload_off() {
    let complete = Arc::new(AtomicUsize::new(0));
    let c = complete.clone();
    let mock = Mock::start(move |req: Request<Incoming>| {
        let c = c.clone();
        async move {
            if read_body(req.into_body()).await.is_ok() {
                c.fetch_add(1, SeqCst);
            }
            json(200, r#"{"id":"ok"}"#)
        }
    })
    .await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\n[models.other]\ndeployments = [{ upstream = \"a\" }]\n";
    let toml = format!(
        "[server]\nretry_buffer = \"1KiB\"\n\n{}",
        config(&[&mock.url()], models, "")
    );
    let sidecar = Sidecar::start(&toml, KEYS).await;
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}],"model":"other"}}"#,
        "x".repeat(8192)
    );
    // Chunked (no length), so it streams past retry_buffer.
    let (tx, stream) = channel();
    let req = Request::post(sidecar.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(stream)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<MockBody>();
    let res = tokio::spawn(async move { client.request(req).await });
    for piece in body.as_bytes().chunks(1000) {
        if tx.send(Bytes::copy_from_slice(piece)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let res = tokio::time::timeout(Duration::from_secs(20), res)
        .await
        .unwrap()
        .unwrap();
    if let Ok(res) = res {
        let (head, got) = collect(res).await;
        assert_sluice_error(&head, &got, 400, "ambiguous_request_body");
    }
    assert_eq!(
        complete.load(SeqCst),
        0,
        "the upstream never got a whole body"
    );
}

#[tokio::test]
async fn a_model_past_peek_limit_is_413() {
    let (mock, log) = upstream(vec![OK]).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\n";
    let sidecar = Sidecar::start(&config(&[&mock.url()], models, "peek_limit = 64\n"), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let late = format!(r#"{{"messages":["{}"],"model":"m"}}"#, "x".repeat(100));
    let (head, body) = post(&url, late).await;
    assert_sluice_error(&head, &body, 413, "routing_body_too_large");
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_model_reached_only_as_a_fallback_cannot_be_named_by_clients() {
    // Few models are looked up by comparing names, many by hashing: both.
    for n in [2usize, 12] {
        let (mock, log) = upstream(vec![OK]).await;
        let mut models = String::new();
        for i in 0..n {
            let fallback = if i == 0 {
                ", fallbacks = [\"backup\"]"
            } else {
                ""
            };
            models.push_str(&format!(
                "[models.m{i}]\ndeployments = [{{ upstream = \"a\", model = \"d{i}\" }}]\n{}\n",
                fallback.trim_start_matches(", ")
            ));
        }
        models.push_str("[models.backup]\ndeployments = [{ upstream = \"a\", model = \"b\" }]\n");
        let allowed: Vec<String> = (0..n).map(|i| format!("\"m{i}\"")).collect();
        let route = format!("models = [{}]\n", allowed.join(", "));
        let sidecar = Sidecar::start(&config(&[&mock.url()], &models, &route), KEYS).await;
        let url = sidecar.url("/v1/chat/completions");
        let last = format!("m{}", n - 1);
        let (head, _) = post(&url, chat(&last)).await;
        assert_eq!(head.status(), 200, "{n} models");
        assert_eq!(
            head.headers()["x-sluice-model"],
            format!("d{}", n - 1).as_str()
        );
        let (head, body) = post(&url, chat("backup")).await;
        assert_sluice_error(&head, &body, 404, "model_not_found");
        let (head, body) = post(&url, chat("m")).await;
        assert_sluice_error(&head, &body, 404, "model_not_found");
        assert_eq!(log.lock().unwrap().len(), 1, "{n} models");
    }
}

// Wall clock, bounds only: the fallback's answer comes over a socket after
// the primary's timeout, which the paused clock could race.
#[tokio::test]
async fn first_event_commit_fails_over_a_stream_that_sends_headers_then_nothing() {
    let silent = sse_after(Duration::from_secs(3600), &[]).await;
    const GOOD: &[&str] = &["data: {\"choices\":[]}\n\n", "data: [DONE]\n\n"];
    let (b, b_hits) = sse_upstream(GOOD, false).await;
    let models = "[models.m]\ndeployments = [{ upstream = \"a\" }]\nattempts = 1\nfallbacks = [\"f\"]\n[models.f]\ndeployments = [{ upstream = \"b\" }]\n";
    let route =
        "[routes.retry]\ncommit = \"first-event\"\n[routes.timeouts]\nfirst_byte = \"1s\"\n";
    let sidecar = Sidecar::start(&config(&[&silent.url(), &b.url()], models, route), KEYS).await;
    let started = Instant::now();
    let (head, body) = post(&sidecar.url("/v1/chat/completions"), chat("m")).await;
    let took = started.elapsed();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-upstream"], "b");
    assert_eq!(head.headers()["x-sluice-fallbacks"], "1");
    assert_eq!(body, GOOD.concat().as_bytes());
    assert_eq!(b_hits.load(SeqCst), 1);
    // The primary had first_byte to send its first event.
    assert!(took >= Duration::from_secs(1), "{took:?}");
}

/// A mock that answers after `delay`, counting the requests it took.
async fn slow_upstream(delay: Duration) -> (Mock, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    let mock = Mock::start(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, SeqCst);
            let _ = read_body(req.into_body()).await;
            tokio::time::sleep(delay).await;
            Response::builder()
                .header("content-type", "application/json")
                .body(full(r#"{"id":"ok"}"#))
                .unwrap()
        }
    })
    .await;
    (mock, n)
}

/// `n` chats for model `m` one after another, all 200: what `header` said of each.
async fn answered(url: &str, n: usize, header: &str) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let (head, _) = post(url, chat("m")).await;
        assert_eq!(head.status(), 200);
        out.push(head.headers()[header].to_str().unwrap().to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_at_its_max_concurrent_is_passed_over_not_refused() {
    let (a, a_seen) = slow_upstream(Duration::from_millis(600)).await;
    let (b, b_seen) = slow_upstream(Duration::ZERO).await;
    // a is preferred; it takes one request at a time.
    let models = "[models.m]\ndeployments = [{ upstream = \"a\", max_concurrent = 1 }, { upstream = \"b\", priority = 1 }]\nbalance = \"priority\"\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, ""), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let first = tokio::spawn({
        let url = url.clone();
        async move { post(&url, chat("m")).await.0 }
    });
    while a_seen.load(SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-upstream"], "b");
    let first = first.await.unwrap();
    assert_eq!(first.headers()["x-sluice-upstream"], "a");
    assert_eq!((a_seen.load(SeqCst), b_seen.load(SeqCst)), (1, 1));
    // Free again: a takes the next one.
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(head.headers()["x-sluice-upstream"], "a");
}

#[tokio::test]
async fn rpm_and_tpm_steer_to_deployments_and_models_with_room() {
    let (a, a_seen) = slow_upstream(Duration::ZERO).await;
    let (b, b_seen) = slow_upstream(Duration::ZERO).await;
    // rpm = 6: a bucket of one request (ten seconds' worth), refilled in 10 s.
    let models = "[models.m]\ndeployments = [{ upstream = \"a\", rpm = 6 }, { upstream = \"b\", priority = 1 }]\nbalance = \"priority\"\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, ""), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let to = answered(&url, 3, "x-sluice-upstream").await;
    assert_eq!(to, ["a", "b", "b"]);
    assert_eq!((a_seen.load(SeqCst), b_seen.load(SeqCst)), (1, 2));

    // tpm on a model's only deployment: the chain's next model takes what
    // does not fit; when nothing has room, the request still goes.
    let (c, c_seen) = slow_upstream(Duration::ZERO).await;
    let (d, d_seen) = slow_upstream(Duration::ZERO).await;
    // tpm = 600: a bucket of 100 tokens; each request estimates ~1,040.
    let models = "[models.m]\ndeployments = [{ upstream = \"a\", model = \"big\", tpm = 600 }]\nfallbacks = [\"n\"]\n\
                  [models.n]\ndeployments = [{ upstream = \"b\", model = \"small\", rpm = 6 }]\n";
    let sidecar = Sidecar::start(&config(&[&c.url(), &d.url()], models, ""), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let to = answered(&url, 3, "x-sluice-model").await;
    // An estimate over the burst passes on a full bucket (then it is in
    // debt); the second goes to the fallback; the third finds no room
    // anywhere and goes to the requested model anyway.
    assert_eq!(to, ["big", "small", "big"]);
    assert_eq!((c_seen.load(SeqCst), d_seen.load(SeqCst)), (2, 1));
}

/// An attempt that failed at a deployment with `tpm` gives its charge
/// back, even when the retry goes to a deployment without one: that
/// deployment's usage is not settled on the first one's bucket.
#[tokio::test]
async fn a_failed_attempts_tpm_charge_is_refunded_whatever_answers_next() {
    const USED: &str = r#"{"id":"ok","usage":{"prompt_tokens":50,"completion_tokens":50}}"#;
    let (a, a_log) = upstream(vec![(503, "", r#"{"error":"busy"}"#), (200, "", USED)]).await;
    let (b, b_log) = upstream(vec![(200, "", USED)]).await;
    // a: tpm 600, a bucket of 100 tokens; each request estimates ~1,040.
    let models = "[models.m]\ndeployments = [{ upstream = \"a\", tpm = 600 }, { upstream = \"b\", priority = 1 }]\nbalance = \"priority\"\n";
    let route = "[routes.retry]\nattempts = 2\n";
    let sidecar = Sidecar::start(&config(&[&a.url(), &b.url()], models, route), KEYS).await;
    let url = sidecar.url("/v1/chat/completions");
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-upstream"], "b");
    // a got its estimate back: full again, it takes the next request. Had
    // b's 100 tokens been settled on a's bucket, a would be 10 s from full.
    let (head, _) = post(&url, chat("m")).await;
    assert_eq!(head.headers()["x-sluice-upstream"], "a");
    assert_eq!(
        (a_log.lock().unwrap().len(), b_log.lock().unwrap().len()),
        (2, 1)
    );
}
