//! Traces (SPEC §12) against a real OTLP/HTTP receiver: one server span
//! per request and one client span per attempt, the client's trace kept,
//! the attempt's context sent upstream, usage and the response model on the
//! attempt that answered, a stream's span ending with the stream, nothing
//! of a prompt, a completion or a key in any attribute, and a collector
//! that is down or hung costing requests nothing.
//!
//! sluice runs as a process with `OTEL_BSP_SCHEDULE_DELAY=50` (the SDK's
//! own variable), so spans arrive within moments rather than 5 s.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::models::{chat, config, upstream};
use crate::support::otlp::{self, duration, float, hex, int, text, Collector, SpanKind};
use crate::support::*;

/// Found in the prompt, the tool arguments, the completion and the keys:
/// never in anything exported.
const CANARY: &str = "CANARY-5e1f0c";

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// Keys with the canary in them.
const KEYS: &[(&str, &str)] = &[
    ("KEY_A", "sk-a-CANARY-5e1f0c"),
    ("KEY_B", "sk-b-CANARY-5e1f0c"),
    ("KEY_C", "sk-c-CANARY-5e1f0c"),
    ("OTEL_BSP_SCHEDULE_DELAY", "50"),
];

/// An answer with the canary in its content and a tool call's arguments,
/// 7 tokens in and 3 out.
const ANSWER: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"small-c-2025-01-01","choices":[{"index":0,"message":{"role":"assistant","content":"CANARY-5e1f0c","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\"q\":\"CANARY-5e1f0c\"}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;

/// A chat for `model` with the canary in a message and in a tool call's
/// arguments.
fn secret_chat(model: &str) -> String {
    chat(model).replace(
        r#""content":"hi"}"#,
        r#""content":"CANARY-5e1f0c"},{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\"q\":\"CANARY-5e1f0c\"}"}}]}"#,
    )
}

fn telemetry(collector: &Collector, extra: &str) -> String {
    format!(
        "[telemetry.otlp]\nendpoint = \"{}\"\nservice_name = \"sluice-test\"\n{extra}\n",
        collector.url()
    )
}

fn server(toml: &str) -> String {
    format!("[server]\nlisten = \"127.0.0.1:0\"\n\n{toml}")
}

async fn post(url: &str, headers: &[(&str, &str)], body: String) -> (Response<()>, Bytes) {
    let mut req = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    collect(send(&client(), req.body(Full::new(Bytes::from(body))).unwrap()).await).await
}

fn by_kind(spans: &[Span], kind: SpanKind) -> Vec<Span> {
    let mut out: Vec<Span> = spans
        .iter()
        .filter(|s| s.kind == kind as i32)
        .cloned()
        .collect();
    out.sort_by_key(|s| int(s, "sluice.attempt"));
    out
}

fn is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == SpanStatus::Error as i32)
}

#[tokio::test]
async fn a_request_tried_three_times_is_one_server_span_over_three_attempt_spans() {
    // Two deployments of "big" answer 503, the fallback "small" answers.
    let collector = Collector::start().await;
    let busy = (503, "", r#"{"error":{"message":"busy"}}"#);
    let (a, a_log) = upstream(vec![busy]).await;
    let (b, b_log) = upstream(vec![busy]).await;
    let (c, c_log) = upstream(vec![(200, "", ANSWER)]).await;
    let models = "[models.big]\ndeployments = [{ upstream = \"a\", model = \"big-a\" }, { upstream = \"b\", model = \"big-b\" }]\nfallbacks = [\"small\"]\n\n[models.small]\ndeployments = [{ upstream = \"c\", model = \"small-c\" }]\n";
    let toml = server(&format!(
        "{}\n{}",
        config(&[&a.url(), &b.url(), &c.url()], models, ""),
        telemetry(&collector, "")
    ));
    let mut proxy = Process::start(&toml, KEYS).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let (head, body) = post(
        &proxy.url("/v1/chat/completions"),
        &[
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque"),
            ("x-request-id", "traced-1"),
            ("authorization", "Bearer sk-client-CANARY-5e1f0c"),
        ],
        secret_chat("big"),
    )
    .await;
    assert_eq!(head.status(), 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(head.headers()["x-sluice-attempts"], "3");
    // The canary did pass through: its absence below means something.
    assert!(String::from_utf8_lossy(&body).contains(CANARY));
    assert!(String::from_utf8_lossy(&c_log.lock().unwrap()[0].2).contains(CANARY));

    let spans = collector.wait_for_spans(4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let servers = by_kind(&spans, SpanKind::Server);
    assert_eq!(servers.len(), 1, "{spans:#?}");
    let server = &servers[0];
    assert_eq!(server.name, "POST llm");
    assert_eq!(
        hex(&server.trace_id),
        TRACE_ID,
        "the client's trace is kept"
    );
    assert_eq!(hex(&server.parent_span_id), PARENT_ID);
    assert_eq!(text(server, "sluice.route").as_deref(), Some("llm"));
    assert_eq!(int(server, "http.response.status_code"), Some(200));
    assert_eq!(int(server, "sluice.attempts"), Some(3));
    assert_eq!(int(server, "sluice.fallbacks"), Some(1));
    assert_eq!(
        text(server, "sluice.requested_model").as_deref(),
        Some("big")
    );
    assert_eq!(
        text(server, "sluice.request_id").as_deref(),
        Some("traced-1")
    );
    // The operation is the attempts' (GenAI spans are the client ones).
    assert_eq!(text(server, "gen_ai.operation.name"), None);
    assert!(!is_error(server));

    let attempts = by_kind(&spans, SpanKind::Client);
    assert_eq!(attempts.len(), 3, "{spans:#?}");
    for (i, span) in attempts.iter().enumerate() {
        assert_eq!(int(span, "sluice.attempt"), Some(i as i64 + 1));
        assert_eq!(span.trace_id, server.trace_id);
        assert_eq!(
            span.parent_span_id,
            server.span_id,
            "attempt {} under the server span",
            i + 1
        );
        assert_eq!(text(span, "gen_ai.operation.name").as_deref(), Some("chat"));
        // An upstream with no preset is "custom".
        assert_eq!(
            text(span, "gen_ai.provider.name").as_deref(),
            Some("custom")
        );
        assert_eq!(text(span, "server.address").as_deref(), Some("127.0.0.1"));
        assert!(span.start_time_unix_nano >= server.start_time_unix_nano);
        assert!(span.end_time_unix_nano <= server.end_time_unix_nano);
    }
    // The two that failed, in either order (balancing picks the first).
    for span in &attempts[..2] {
        let model = text(span, "gen_ai.request.model").unwrap();
        let (name, log, port) = match model.as_str() {
            "big-a" => ("a", &a_log, a.addr.port()),
            "big-b" => ("b", &b_log, b.addr.port()),
            other => panic!("attempt on {other}"),
        };
        assert_eq!(span.name, format!("chat {model}"));
        assert_eq!(
            text(span, "sluice.deployment").as_deref(),
            Some(&*format!("{name}/{model}"))
        );
        assert_eq!(text(span, "sluice.upstream").as_deref(), Some(name));
        assert_eq!(int(span, "server.port"), Some(i64::from(port)));
        assert_eq!(int(span, "http.response.status_code"), Some(503));
        assert_eq!(text(span, "error.type").as_deref(), Some("503"));
        assert!(is_error(span));
        assert_eq!(text(span, "sluice.fallback_from"), None);
        assert_eq!(text(span, "sluice.requested_model").as_deref(), Some("big"));
        assert_eq!(
            int(span, "gen_ai.usage.input_tokens"),
            None,
            "usage only where it answered"
        );
        // Upstream, the attempt's own context, and the client's state.
        let headers = &log.lock().unwrap()[0].1;
        assert_eq!(
            headers["traceparent"],
            format!("00-{TRACE_ID}-{}-01", hex(&span.span_id)).as_str()
        );
        assert_eq!(headers["tracestate"], "vendor=opaque");
    }
    let answered = &attempts[2];
    assert_eq!(answered.name, "chat small-c");
    assert_eq!(
        text(answered, "gen_ai.request.model").as_deref(),
        Some("small-c")
    );
    assert_eq!(
        text(answered, "gen_ai.response.model").as_deref(),
        Some("small-c-2025-01-01")
    );
    // The name the client sent, beside the one sent upstream (SPEC §12).
    assert_eq!(
        text(answered, "sluice.requested_model").as_deref(),
        Some("big")
    );
    assert_eq!(
        text(answered, "sluice.deployment").as_deref(),
        Some("c/small-c")
    );
    assert_eq!(
        text(answered, "sluice.fallback_from").as_deref(),
        Some("big")
    );
    assert_eq!(int(answered, "gen_ai.usage.input_tokens"), Some(7));
    assert_eq!(int(answered, "gen_ai.usage.output_tokens"), Some(3));
    assert_eq!(int(answered, "http.response.status_code"), Some(200));
    assert_eq!(text(answered, "error.type"), None);
    assert!(!is_error(answered));
    let headers = c_log.lock().unwrap()[0].1.clone();
    assert_eq!(
        headers["traceparent"],
        format!("00-{TRACE_ID}-{}-01", hex(&answered.span_id)).as_str()
    );

    // Nothing of the prompt, the completion, the tool arguments or a key.
    let everything = collector.everything();
    assert!(
        !everything.contains(CANARY),
        "the canary was exported:\n{everything}"
    );
    assert!(
        !everything.contains("sk-"),
        "a key was exported:\n{everything}"
    );
    assert!(matches!(
        collector.resource_attr("service.name"),
        Some(otlp::Value::StringValue(s)) if s == "sluice-test"
    ));
    proxy.stop().await;
    assert!(!proxy.output().contains(CANARY), "{}", proxy.output());
}

#[tokio::test]
async fn a_plain_route_retried_twice_starts_its_own_trace_and_sends_each_attempts_context() {
    // No incoming traceparent: the server span is a root. A route without
    // models knows no model: no gen_ai.request.model.
    let collector = Collector::start().await;
    let busy = (503, "", "{}");
    let (up, log) = upstream(vec![busy, busy, (200, "", ANSWER)]).await;
    let toml = server(&format!(
        "{}\n[routes.retry]\nbackoff_base = \"1ms\"\nbackoff_max = \"2ms\"\n\n{}",
        one_route(&up.url(), ""),
        telemetry(&collector, "")
    ));
    let proxy = Process::start(&toml, KEYS).await;
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], chat("gpt-4.1")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["x-sluice-attempts"], "3");
    let spans = collector.wait_for_spans(4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let server = &by_kind(&spans, SpanKind::Server)[0];
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(server.name, "POST all");
    let attempts = by_kind(&spans, SpanKind::Client);
    assert_eq!(attempts.len(), 3);
    let seen = log.lock().unwrap();
    for (i, span) in attempts.iter().enumerate() {
        assert_eq!(span.parent_span_id, server.span_id);
        assert_eq!(span.name, "chat");
        assert_eq!(text(span, "gen_ai.request.model"), None);
        assert_eq!(text(span, "sluice.deployment"), None);
        let want = format!("00-{}-{}-01", hex(&server.trace_id), hex(&span.span_id));
        assert_eq!(seen[i].1["traceparent"], want.as_str(), "attempt {}", i + 1);
    }
    assert_eq!(int(&attempts[2], "gen_ai.usage.output_tokens"), Some(3));
    assert_eq!(
        text(&attempts[2], "gen_ai.response.model").as_deref(),
        Some("small-c-2025-01-01")
    );
}

#[tokio::test]
async fn without_propagate_upstream_the_clients_trace_headers_pass_unchanged() {
    let collector = Collector::start().await;
    let (up, log) = upstream(vec![(200, "", ANSWER)]).await;
    let toml = server(&format!(
        "{}\n{}",
        one_route(&up.url(), ""),
        telemetry(&collector, "propagate_upstream = false")
    ));
    let proxy = Process::start(&toml, KEYS).await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let headers = [
        ("traceparent", &*traceparent),
        ("tracestate", "vendor=opaque"),
    ];
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &headers, chat("m")).await;
    assert_eq!(head.status(), 200);
    // And with none, none is made up.
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], chat("m")).await;
    assert_eq!(head.status(), 200);
    let spans = collector.wait_for_spans(4).await;
    let seen = log.lock().unwrap();
    assert_eq!(seen[0].1["traceparent"], traceparent.as_str());
    assert_eq!(seen[0].1["tracestate"], "vendor=opaque");
    assert!(!seen[1].1.contains_key("traceparent"));
    // The spans are still the client's trace's children.
    let server = by_kind(&spans, SpanKind::Server)
        .into_iter()
        .find(|s| hex(&s.trace_id) == TRACE_ID)
        .expect("a server span in the client's trace");
    assert_eq!(hex(&server.parent_span_id), PARENT_ID);
}

#[tokio::test]
async fn a_streamed_answers_span_ends_with_the_stream_and_records_its_first_chunk() {
    let collector = Collector::start().await;
    let mock = Mock::start(|_| async {
        let (tx, body) = channel();
        tokio::spawn(async move {
            let first = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-2024","choices":[{"index":0,"delta":{"content":"CANARY-5e1f0c"}}]}"#;
            tx.send(format!("{first}\n\n")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let usage = r#"data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-2024","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}"#;
            tx.send(format!("{usage}\n\ndata: [DONE]\n\n")).await.unwrap();
        });
        sse(body)
    })
    .await;
    let toml = server(&format!(
        "{}\n{}",
        one_route(&mock.url(), ""),
        telemetry(&collector, "")
    ));
    let proxy = Process::start(&toml, KEYS).await;
    let started = Instant::now();
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"CANARY-5e1f0c"}]}"#;
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res: Response<Incoming> = send(&client(), req).await;
    assert_eq!(res.status(), 200);
    let got = res.into_body().collect().await.unwrap().to_bytes();
    let took = started.elapsed();
    assert!(String::from_utf8_lossy(&got).contains("[DONE]"));

    let spans = collector.wait_for_spans(2).await;
    let server = &by_kind(&spans, SpanKind::Server)[0];
    let attempt = &by_kind(&spans, SpanKind::Client)[0];
    // The attempt lasts as long as its body, not its head.
    let lasted = duration(attempt);
    assert!(
        lasted >= Duration::from_millis(550),
        "span ended early: {lasted:?}"
    );
    assert!(lasted <= took, "{lasted:?} > {took:?}");
    assert!(duration(server) >= lasted);
    let first = float(attempt, "sluice.time_to_first_chunk").expect("time to first chunk");
    assert!(
        first >= 0.0 && first < lasted.as_secs_f64() - 0.5,
        "first chunk at {first} s of {lasted:?}"
    );
    let event = attempt
        .events
        .iter()
        .find(|e| e.name == "first_chunk")
        .expect("a first_chunk event");
    assert!(event.time_unix_nano < attempt.end_time_unix_nano);
    assert_eq!(
        text(attempt, "gen_ai.response.model").as_deref(),
        Some("gpt-4o-2024")
    );
    assert_eq!(int(attempt, "gen_ai.usage.input_tokens"), Some(11));
    assert_eq!(int(attempt, "gen_ai.usage.output_tokens"), Some(5));
    assert!(!collector.everything().contains(CANARY));
}

#[tokio::test]
async fn sample_ratio_zero_exports_nothing_and_still_passes_an_unsampled_context_upstream() {
    let collector = Collector::start().await;
    let (up, log) = upstream(vec![(200, "", ANSWER)]).await;
    let toml = server(&format!(
        "{}\n{}",
        one_route(&up.url(), ""),
        telemetry(&collector, "sample_ratio = 0.0")
    ));
    let proxy = Process::start(&toml, KEYS).await;
    for _ in 0..5 {
        let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], chat("m")).await;
        assert_eq!(head.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(collector.spans().is_empty(), "{:#?}", collector.spans());
    let seen = log.lock().unwrap();
    let traceparent = seen[0].1["traceparent"].to_str().unwrap();
    assert!(traceparent.ends_with("-00"), "not sampled: {traceparent}");
}

/// Sends 20 requests one after another: each must be quick while the
/// collector is unreachable, then the export error counter must move.
async fn unaffected_by(collector_url: &str, timeout: &str) {
    let (up, _) = upstream(vec![(200, "", ANSWER)]).await;
    let toml = server(&format!(
        "{}\n[telemetry.otlp]\nendpoint = \"{collector_url}\"\ntimeout = \"{timeout}\"\n",
        one_route(&up.url(), ""),
    ));
    let mut proxy = Process::start(&toml, KEYS).await;
    let client = client();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let req = Request::post(proxy.url("/v1/chat/completions"))
            .body(Full::new(Bytes::from(chat("m"))))
            .unwrap();
        let (head, _) = collect(send(&client, req).await).await;
        assert_eq!(head.status(), 200, "request {i}");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An export on the request path would cost a request its timeout (5 s).
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request {slowest:?}"
    );
    let admin = proxy.admin.expect("admin listener");
    let deadline = Instant::now() + Duration::from_secs(20);
    let errors = loop {
        let (_, scrape) = get(&format!("http://{admin}/metrics")).await;
        let scrape = String::from_utf8_lossy(&scrape).into_owned();
        let errors =
            metric(&scrape, r#"sluice_trace_exports_total{result="error"}"#).unwrap_or(0.0);
        if errors >= 2.0 {
            let ok = metric(&scrape, r#"sluice_trace_exports_total{result="ok"}"#);
            assert_eq!(ok.unwrap_or(0.0), 0.0);
            break errors;
        }
        assert!(
            Instant::now() < deadline,
            "no export errors counted:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    proxy.stop().await;
    // Logged at a bounded rate: the first failure, not one line per export.
    let out = proxy.output();
    let lines = out
        .lines()
        .filter(|l| l.contains("spans not exported"))
        .count();
    assert!(lines >= 1, "the loss is logged:\n{out}");
    assert!(
        (lines as f64) < errors,
        "{lines} log lines for {errors} failed exports:\n{out}"
    );
}

#[tokio::test]
async fn a_collector_that_is_down_costs_requests_nothing_and_is_counted() {
    unaffected_by(&format!("http://127.0.0.1:{}", refused_port()), "5s").await;
}

#[tokio::test]
async fn a_collector_that_hangs_costs_requests_nothing_and_is_counted() {
    // It takes each export and never answers: each waits out its 1 s.
    let collector = Collector::answering_after(Duration::from_secs(3600)).await;
    unaffected_by(&collector.url(), "1s").await;
}

#[tokio::test]
async fn a_reload_moves_traces_to_the_new_collector_and_the_old_one_gets_what_it_held() {
    let (old, new) = (Collector::start().await, Collector::start().await);
    let (up, _) = upstream(vec![(200, "", ANSWER)]).await;
    let toml = |c: &Collector| {
        server(&format!(
            "{}\n{}",
            one_route(&up.url(), ""),
            telemetry(c, "")
        ))
    };
    // A 5 s batch delay: the old exporter still holds the first request's
    // spans when the reload replaces it.
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "5000")];
    let mut proxy = Process::start(&toml(&old), &env).await;
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], chat("m")).await;
    assert_eq!(head.status(), 200);
    let admin = proxy.admin.expect("admin listener");
    let mut config = toml(&new);
    // Keep the admin port the process has.
    config = config.replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"\nadmin_listen = \"{admin}\"", proxy.addr),
        1,
    );
    std::fs::write(proxy.config_path(), config).unwrap();
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, scrape) = get(&format!("http://{admin}/metrics")).await;
        let scrape = String::from_utf8_lossy(&scrape).into_owned();
        if metric(&scrape, r#"sluice_config_reloads_total{result="ok"}"#) == Some(1.0) {
            break;
        }
        assert!(
            metric(&scrape, r#"sluice_config_reloads_total{result="error"}"#).is_none(),
            "reload refused: {}",
            proxy.output()
        );
        assert!(Instant::now() < deadline, "no reload:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], chat("m")).await;
    assert_eq!(head.status(), 200);
    // The old exporter sends what it held once its last span ended.
    let before = old.wait_for_spans(2).await;
    assert_eq!(before.len(), 2, "{before:#?}");
    proxy.stop().await;
    // The new one sends at exit, within its close wait.
    let after = new.wait_for_spans(2).await;
    assert_eq!(after.len(), 2, "{after:#?}");
    assert_ne!(before[0].trace_id, after[0].trace_id);
}

#[tokio::test]
async fn spans_past_the_queue_limit_are_dropped_and_said_so_while_requests_go_on() {
    // A collector that never answers and room for four spans: the rest
    // of twenty requests' spans are turned away, not held.
    let collector = Collector::answering_after(Duration::from_secs(3600)).await;
    let (up, _) = upstream(vec![(200, "", ANSWER)]).await;
    let toml = server(&format!(
        "{}\n[telemetry.otlp]\nendpoint = \"{}\"\ntimeout = \"30s\"\n",
        one_route(&up.url(), ""),
        collector.url()
    ));
    let env = [
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "4"),
    ];
    let mut proxy = Process::start(&toml, &env).await;
    for i in 0..20 {
        let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], chat("m")).await;
        assert_eq!(head.status(), 200, "request {i}");
    }
    proxy.stop().await;
    let out = proxy.output();
    assert!(
        out.contains("OTEL_BSP_MAX_QUEUE_SIZE"),
        "the drop is logged:\n{out}"
    );
    // At most the four that fit (two requests) were ever posted.
    assert!(collector.spans().len() <= 4, "{:#?}", collector.spans());
}

#[tokio::test]
async fn an_attempt_the_client_left_during_still_has_its_span() {
    // The upstream never answers; the client gives up. The attempt's
    // span (whose traceparent went upstream) is exported, cancelled.
    let collector = Collector::start().await;
    let mock = Mock::start(|_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        json(200, "{}")
    })
    .await;
    let toml = server(&format!(
        "{}\n{}",
        one_route(&mock.url(), ""),
        telemetry(&collector, "")
    ));
    let proxy = Process::start(&toml, KEYS).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        post(&proxy.url("/v1/chat/completions"), &[], chat("m")),
    )
    .await;
    assert!(gave_up.is_err(), "the upstream answered");
    let spans = collector.wait_for_spans(2).await;
    let attempts = by_kind(&spans, SpanKind::Client);
    assert_eq!(attempts.len(), 1, "{spans:#?}");
    assert_eq!(
        text(&attempts[0], "error.type").as_deref(),
        Some("cancelled")
    );
    assert!(is_error(&attempts[0]));
    let seen = mock.seen();
    let want = format!(
        "00-{}-{}-01",
        hex(&attempts[0].trace_id),
        hex(&attempts[0].span_id)
    );
    assert_eq!(seen[0].headers["traceparent"], want.as_str());
    let server = &by_kind(&spans, SpanKind::Server)[0];
    assert_eq!(int(server, "sluice.attempts"), Some(1));
}
