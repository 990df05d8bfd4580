//! Logs: one access line per request with the SPEC's fields, the request id
//! on every line of the request, text and JSON, RUST_LOG override, and no
//! provider key in any output even at trace level.

use http::Request;
use http_body_util::Full;

use crate::support::raw::Conn;
use crate::support::*;

const KEY: &str = "sk-live-SECRET-never-log-4f2a9c";

fn config(mock: &str, log: &str) -> String {
    let routes = one_route(mock, "api_key_env = \"UP_KEY\"");
    format!("[server]\nlisten = \"127.0.0.1:0\"\n[log]\n{log}\n{routes}")
}

async fn request(proxy: &Process, path: &str, id: &str) -> u16 {
    let req = Request::post(proxy.url(path))
        .header("x-request-id", id)
        .header("authorization", "Bearer sk-client-placeholder")
        .body(Full::from(r#"{"model":"m"}"#))
        .unwrap();
    collect(send(&client(), req).await)
        .await
        .0
        .status()
        .as_u16()
}

fn lines_with<'a>(out: &'a str, needle: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.contains(needle)).collect()
}

#[tokio::test]
async fn text_access_line_has_every_field_once_per_request() {
    let mock = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
    let mut proxy = Process::start(&config(&mock.url(), ""), &[("UP_KEY", KEY)]).await;
    assert_eq!(
        request(&proxy, "/v1/chat/completions?x=secret-query", "req-text-1").await,
        200
    );
    proxy.stop().await;
    let out = proxy.output();
    let lines = lines_with(&out, "req-text-1");
    assert_eq!(lines.len(), 1, "{out}");
    let line = lines[0];
    for field in [
        " INFO ",
        "id=\"req-text-1\"",
        "method=POST",
        "path=\"/v1/chat/completions\"",
        "route=\"all\"",
        "upstream=\"up\"",
        "status=200",
        "attempts=1",
        "duration_ms=",
        "ttfb_ms=",
        "bytes_out=11",
        "body=\"complete\"",
    ] {
        assert!(line.contains(field), "{field} missing from: {line}");
    }
    // Query strings can carry secrets; they are not logged.
    assert!(!out.contains("secret-query"), "{out}");
}

#[tokio::test]
async fn request_id_is_on_every_line_of_the_request() {
    // Nothing listens at this port: the request logs a warning and the access line.
    let port = refused_port();
    let mut proxy = Process::start(
        &config(&format!("http://127.0.0.1:{port}"), ""),
        &[("UP_KEY", KEY)],
    )
    .await;
    assert_eq!(request(&proxy, "/v1/models", "req-502").await, 502);
    proxy.stop().await;
    let out = proxy.output();
    let lines = lines_with(&out, "req-502");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("upstream connect failed")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("status=502") && l.contains("error=\"upstream_unavailable\"")),
        "{out}"
    );
    // Every line about this request carries its id.
    assert_eq!(
        lines_with(&out, "upstream connect failed").len(),
        lines
            .iter()
            .filter(|l| l.contains("upstream connect failed"))
            .count()
    );
}

#[tokio::test]
async fn json_format_writes_one_json_object_per_line() {
    let mock = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
    let mut proxy = Process::start(
        &config(&mock.url(), "format = \"json\""),
        &[("UP_KEY", KEY)],
    )
    .await;
    assert_eq!(request(&proxy, "/v1/embeddings", "req-json-1").await, 200);
    proxy.stop().await;
    let out = proxy.output();
    let mut access = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "sluice::access" {
            access.push(v);
        }
    }
    assert_eq!(access.len(), 1, "{out}");
    let v = &access[0];
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["span"]["id"], "req-json-1");
    assert_eq!(v["route"], "all");
    assert_eq!(v["upstream"], "up");
    assert_eq!(v["status"], 200);
    assert_eq!(v["attempts"], 1);
    assert_eq!(v["bytes_out"], 11);
    assert!(v["duration_ms"].is_number() && v["ttfb_ms"].is_number());
}

#[tokio::test]
async fn rust_log_overrides_the_configured_level() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    // The config silences access lines; RUST_LOG=info brings them back.
    let level = "level = \"info,sluice::access=off\"";
    let mut quiet = Process::start(&config(&mock.url(), level), &[("UP_KEY", KEY)]).await;
    request(&quiet, "/a", "req-quiet").await;
    quiet.stop().await;
    assert!(!quiet.output().contains("req-quiet"), "{}", quiet.output());

    let env = [("UP_KEY", KEY), ("RUST_LOG", "info")];
    let mut loud = Process::start(&config(&mock.url(), level), &env).await;
    request(&loud, "/a", "req-loud").await;
    loud.stop().await;
    assert!(loud.output().contains("req-loud"), "{}", loud.output());
}

#[tokio::test]
async fn the_key_never_appears_in_any_output_even_at_trace() {
    let mock = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
    let env = [("UP_KEY", KEY), ("RUST_LOG", "trace")];
    let mut proxy = Process::start(&config(&mock.url(), ""), &env).await;
    assert_eq!(
        request(&proxy, "/v1/chat/completions", "req-trace").await,
        200
    );
    assert_eq!(
        mock.seen()[0].headers["authorization"],
        format!("Bearer {KEY}")
    );
    // h2c client too, and a 404.
    let req = Request::get(proxy.url("/v1/models"))
        .body(Full::default())
        .unwrap();
    collect(send(&h2c_client(), req).await).await;
    assert_eq!(proxy.stop().await, Some(0));
    let out = proxy.output();
    assert!(out.contains("req-trace"), "trace output was captured");
    assert!(
        !out.contains(KEY) && !out.contains("SECRET-never-log"),
        "key leaked:\n{out}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_before_the_response_is_logged_as_499() {
    let mock = Mock::start(|_| std::future::pending()).await;
    let mut proxy = Process::start(&config(&mock.url(), ""), &[("UP_KEY", KEY)]).await;
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-request-id: req-gone\r\n\r\n")
        .await;
    // Wait until the upstream has the request, then leave.
    mock.wait_for_requests(1, std::time::Duration::from_secs(5))
        .await;
    drop(conn);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !proxy.output().contains("req-gone") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.stop().await;
    let out = proxy.output();
    let line = lines_with(&out, "req-gone")
        .pop()
        .unwrap_or_else(|| panic!("no access line:\n{out}"));
    assert!(
        line.contains("status=499") && line.contains("body=\"client_gone\""),
        "{line}"
    );
}

#[tokio::test]
async fn silencing_the_access_line_keeps_the_request_id_on_warnings() {
    let port = refused_port();
    let mut proxy = Process::start(
        &config(
            &format!("http://127.0.0.1:{port}"),
            "level = \"info,sluice::access=off\"",
        ),
        &[("UP_KEY", KEY)],
    )
    .await;
    assert_eq!(request(&proxy, "/v1/models", "req-quiet-502").await, 502);
    proxy.stop().await;
    let out = proxy.output();
    assert!(lines_with(&out, "sluice::access").is_empty(), "{out}");
    let warnings = lines_with(&out, "upstream connect failed");
    assert!(!warnings.is_empty(), "{out}");
    for line in warnings {
        assert!(line.contains("request{id=\"req-quiet-502\"}"), "{line}");
    }
}

/// Access lines are written in one batch per turn of the event loop: a
/// burst of requests loses none and tears none, and a line is out as soon
/// as the proxy goes idle, not at the next burst or at exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_are_batched_per_turn_but_never_held_while_idle() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let mut proxy = Process::start(&config(&mock.url(), ""), &[("UP_KEY", KEY)]).await;
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..64 {
        let req = Request::post(proxy.url("/v1/chat/completions"))
            .header("x-request-id", format!("req-burst-{i:02}"))
            .body(Full::from(r#"{"model":"m"}"#))
            .unwrap();
        burst.spawn(async move { collect(send(&client(), req).await).await.0.status() });
    }
    for status in burst.join_all().await {
        assert_eq!(status, 200);
    }
    // Idle now: the lines must be out without another request or an exit.
    assert_eq!(request(&proxy, "/v1/models", "req-alone").await, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !proxy.output().contains("req-alone") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = proxy.output();
    assert!(out.contains("req-alone"), "held while idle:\n{out}");
    for i in 0..64 {
        let id = format!("req-burst-{i:02}");
        let lines = lines_with(&out, &id);
        assert_eq!(lines.len(), 1, "{id}: {lines:?}");
        assert!(
            lines[0].contains("sluice::access: request method=POST")
                // The last field: a JSON 200 without usage says so.
                && lines[0].ends_with("budget_exhausted=false usage=\"none\""),
            "a torn line: {}",
            lines[0]
        );
    }
    proxy.stop().await;
}

/// A request still under way when `shutdown_grace` runs out is dropped
/// with the runtime: on one CPU on the main thread, on several on a worker.
/// Either way its access line is written before the process exits.
async fn line_of_a_request_cut_at_exit(one_cpu: bool) -> String {
    let mock = Mock::start(|_| async {
        let (tx, body) = crate::support::channel();
        tokio::spawn(async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
            while tx.send(chunk.clone()).await.is_ok() {}
        });
        http::Response::builder()
            .header("content-type", "application/octet-stream")
            .body(body)
            .unwrap()
    })
    .await;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n{}",
        one_route(&mock.url(), "")
    );
    let mut proxy = if one_cpu {
        Process::start_on_one_cpu(&toml, &[]).await
    } else {
        Process::start(&toml, &[]).await
    };
    // A client that asks for the stream and never reads it: sluice's write
    // blocks, the body is not polled, the cutoff cannot end it.
    let mut conn = Conn::open(proxy.addr).await;
    conn.send(b"GET /v1/files/x HTTP/1.1\r\nhost: x\r\nx-request-id: req-cut-at-exit\r\n\r\n")
        .await;
    mock.wait_for_requests(1, std::time::Duration::from_secs(5))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    proxy.signal("TERM");
    let code = proxy.exit_within(std::time::Duration::from_secs(10)).await;
    drop(conn);
    let out = proxy.output();
    assert_eq!(code, Some(0), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_of_a_request_cut_at_exit_is_written_on_several_cpus() {
    let out = line_of_a_request_cut_at_exit(false).await;
    assert!(out.contains("req-cut-at-exit"), "line lost:\n{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_of_a_request_cut_at_exit_is_written_on_one_cpu() {
    let out = line_of_a_request_cut_at_exit(true).await;
    assert!(out.contains("req-cut-at-exit"), "line lost:\n{out}");
}
