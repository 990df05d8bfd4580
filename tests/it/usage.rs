//! Token usage (SPEC §10): `include_usage` added to streamed chats and the
//! chunk it causes removed byte-exactly, the silent second try at an
//! upstream that refuses `stream_options`, token limits (refusal, settling,
//! per client, max_wait), usage in the metrics and the access line,
//! Anthropic's usage events, and SSE keep-alives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;

use crate::support::mock::read_body;
use crate::support::*;

// What the upstreams send.

/// Chat chunks as OpenAI streams them when usage was asked for (`"usage":null`).
const CHUNKS: [&str; 3] = [
    concat!(
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}],"usage":null}"#,
        "\n\n"
    ),
    concat!(
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}],"usage":null}"#,
        "\n\n"
    ),
    concat!(
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        "\n\n"
    ),
];

/// The usage-only chunk `include_usage` causes: 7 tokens in, 3 out.
const USAGE_CHUNK: &str = concat!(
    r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#,
    "\n\n"
);

const DONE: &str = "data: [DONE]\n\n";

const JSON_WITH_USAGE: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;

const JSON_TWO_TOKENS: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"H"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

const JSON_WITHOUT_USAGE: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}]}"#;

/// An OpenAI-compatible server's answer to a request with `stream_options`.
const REFUSAL: &str = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":null,"code":null}}"#;

/// An Anthropic stream: 20 tokens in; output 1, then 5, then 12 (cumulative).
const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"model":"claude","usage":{"input_tokens":20,"output_tokens":1}}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":5}}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":12}}"#,
    "\n\n",
    "event: message_stop\n",
    r#"data: {"type":"message_stop"}"#,
    "\n\n"
);

const ANTHROPIC_START: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":20,"output_tokens":1}}}"#,
    "\n\n"
);

const ANTHROPIC_STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/// The chat stream with the usage chunk.
fn with_usage() -> String {
    format!("{}{USAGE_CHUNK}{DONE}", CHUNKS.concat())
}

/// The chat stream without it.
fn without_usage() -> String {
    format!("{}{DONE}", CHUNKS.concat())
}

/// `body` in writes that cut every event in the middle and between the two
/// newlines of its blank line (so writes also span event boundaries).
fn pieces(body: &str) -> Vec<Bytes> {
    let mut cuts = Vec::new();
    let mut start = 0;
    for (at, _) in body.match_indices("\n\n") {
        let end = at + 2;
        cuts.push(start + (end - start) / 2);
        cuts.push(end - 1);
        start = end;
    }
    cuts.push(body.len());
    let mut out = Vec::new();
    let mut from = 0;
    for cut in cuts {
        if cut > from {
            out.push(Bytes::copy_from_slice(&body.as_bytes()[from..cut]));
            from = cut;
        }
    }
    out
}

/// An event stream of these writes, a few milliseconds apart.
fn sse_pieces(pieces: Vec<Bytes>) -> Response<MockBody> {
    let (tx, body) = channel();
    tokio::spawn(async move {
        for p in pieces {
            if tx.send(p).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    sse(body)
}

/// An event stream whose `first` bytes are there with the head, then
/// `rest` after `pause`, then its end.
async fn paused_sse(
    first: &'static str,
    pause: Duration,
    rest: &'static str,
) -> Response<MockBody> {
    let (tx, body) = channel();
    // The channel holds one frame: sent before the head goes out.
    tx.send(first).await.unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(pause).await;
        let _ = tx.send(rest).await;
    });
    sse(body)
}

// The upstreams.

/// The request bodies an upstream received, in order.
type Received = Arc<Mutex<Vec<Bytes>>>;

/// An upstream that records each request body and answers `answer(body)`.
async fn recording<F>(answer: F) -> (Mock, Received)
where
    F: Fn(&[u8]) -> Response<MockBody> + Send + Sync + 'static,
{
    let received = Received::default();
    let kept = received.clone();
    let answer = Arc::new(answer);
    let mock = Mock::start(move |req: Request<Incoming>| {
        let (kept, answer) = (kept.clone(), answer.clone());
        async move {
            let body = read_body(req.into_body()).await.unwrap_or_default();
            kept.lock().unwrap().push(body.clone());
            answer(&body[..])
        }
    })
    .await;
    (mock, received)
}

/// An OpenAI chat upstream: for `"stream": true` the chat stream in
/// [`pieces`], with the usage chunk when `include_usage` is true; else JSON
/// with usage.
async fn chat_upstream() -> (Mock, Received) {
    recording(|body| {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if v["stream"] != true {
            return json(200, JSON_WITH_USAGE);
        }
        let asked = v["stream_options"]["include_usage"] == true;
        sse_pieces(pieces(&if asked { with_usage() } else { without_usage() }))
    })
    .await
}

/// An upstream that answers every request with `body` as an event stream,
/// in [`pieces`].
async fn streaming(body: String) -> (Mock, Received) {
    recording(move |_| sse_pieces(pieces(&body))).await
}

// The configs.

/// Upstream `up` at `url` (with `upstream_extra`), route `r` on `/v1` to
/// it, and the route's tables.
fn config(url: &str, upstream_extra: &str, route_tables: &str) -> String {
    format!(
        "[upstreams.up]\nurl = \"{url}\"\n{upstream_extra}\n\n\
         [[routes]]\nname = \"r\"\npath_prefix = \"/v1\"\nupstream = \"up\"\n{route_tables}\n"
    )
}

/// A custom upstream that may be sent `include_usage`.
const INJECTING: &str = "inject_usage = true";
/// Usage asked for on every streamed chat.
const INJECT: &str = "[routes.usage]\ninject = \"always\"\n";
const ANTHROPIC: &str = "preset = \"anthropic\"\napi_key_env = \"ANTHROPIC_KEY\"";
const ANTHROPIC_ENV: &[(&str, &str)] = &[("ANTHROPIC_KEY", "sk-ant-test")];

/// `[routes.token_limit]` with these lines.
fn limit(lines: &str) -> String {
    format!("[routes.token_limit]\n{lines}\n")
}

/// 10 tokens a second, a burst of 100; a request without a cap is
/// estimated at its bytes / 4 in and 50 out.
const SMALL: &str =
    "tokens_per_minute = 600\nburst = 100\nchars_per_token = 4\ndefault_output_tokens = 50";

// The requests.

/// POSTs a JSON `body` with these headers; the whole response.
async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (Response<()>, Bytes) {
    let mut req = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    collect(send(&client(), req).await).await
}

/// A chat body, with `extra` fields after `messages`.
fn chat(extra: &str) -> String {
    format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#)
}

const STREAM: &str = r#","stream":true"#;

/// A non-streamed chat body of exactly `len` bytes (an input estimate of
/// `len / 4` tokens).
fn sized(len: usize) -> String {
    let frame = chat(r#","user":"""#).len();
    let body = chat(&format!(r#","user":"{}""#, "x".repeat(len - frame)));
    assert_eq!(body.len(), len);
    body
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn parse(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(b)))
}

/// A response header as text; panics if it is missing.
fn header<'a>(head: &'a Response<()>, name: &str) -> &'a str {
    head.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name}: {:?}", head.headers()))
        .to_str()
        .unwrap()
}

// The metrics.

const INPUT: &str = r#"sluice_tokens_total{route="r",upstream="up",model="-",type="input"}"#;
const OUTPUT: &str = r#"sluice_tokens_total{route="r",upstream="up",model="-",type="output"}"#;

/// Scrapes until `ok` holds (a request's figures are recorded when sluice
/// lets go of its body, just after the client has read it); panics with
/// the last scrape after 5 s.
async fn scrape_until(proxy: &Sidecar, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = text(&get(&proxy.admin_url("/metrics")).await.1);
        if ok(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what} not within 5 s:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many `ping`s `body` starts with, and what follows them.
fn leading<'a>(body: &'a str, ping: &str) -> (usize, &'a str) {
    let (mut n, mut rest) = (0, body);
    while let Some(r) = rest.strip_prefix(ping) {
        (n, rest) = (n + 1, r);
    }
    (n, rest)
}

// Injection.

/// A streamed chat is sent `include_usage`; the client gets every byte but the usage chunk.
#[tokio::test]
async fn the_injected_usage_chunk_is_stripped_byte_exactly() {
    let (mock, received) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let sent = chat(STREAM);
    let (head, body) = post(&proxy.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "text/event-stream");
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let mut expected = parse(sent.as_bytes());
    expected["stream_options"] = serde_json::json!({"include_usage": true});
    assert_eq!(parse(&received[0]), expected);
    assert_eq!(text(&body), without_usage());
}

/// A client that asked for usage itself: its body passes as sent and it gets the chunk.
#[tokio::test]
async fn a_client_that_asked_for_usage_is_left_alone() {
    let (mock, received) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let sent = chat(r#","stream":true,"stream_options":{"include_usage":true}"#);
    let (head, body) = post(&proxy.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&received.lock().unwrap()[0]), sent);
    assert_eq!(text(&body), with_usage());
}

/// `include_usage: false` is made true upstream (nothing else changes) and the chunk stripped.
#[tokio::test]
async fn include_usage_false_is_set_and_its_chunk_stripped() {
    let (mock, received) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let sent = chat(r#","stream":true,"stream_options":{"include_usage":false}"#);
    let (head, body) = post(&proxy.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(head.status(), 200);
    let mut expected = parse(sent.as_bytes());
    expected["stream_options"]["include_usage"] = true.into();
    assert_eq!(parse(&received.lock().unwrap()[0]), expected);
    assert_eq!(text(&body), without_usage());
}

/// Neither `"stream": false` nor a path other than /chat/completions is ever rewritten.
#[tokio::test]
async fn only_streamed_chats_are_rewritten() {
    let (mock, received) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let sent = chat(r#","stream":false"#);
    let (head, body) = post(&proxy.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&received.lock().unwrap()[0]), sent);
    assert_eq!(text(&body), JSON_WITH_USAGE);
    let sent = r#"{"model":"m","prompt":"hi","stream":true}"#;
    let (head, body) = post(&proxy.url("/v1/completions"), &[], sent).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&received.lock().unwrap()[1]), sent);
    assert_eq!(text(&body), without_usage());
}

/// A custom upstream without `inject_usage = true` is never asked, even with `inject = "always"`.
#[tokio::test]
async fn a_custom_upstream_is_not_asked_unless_it_says_it_may_be() {
    let (mock, received) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), "", INJECT), &[]).await;
    let sent = chat(STREAM);
    let (head, body) = post(&proxy.url("/v1/chat/completions"), &[], &sent).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&received.lock().unwrap()[0]), sent);
    assert_eq!(text(&body), without_usage());
}

/// A refusal of `stream_options` is retried without it, silently, and not asked again.
#[tokio::test]
async fn an_upstream_refusing_stream_options_is_retried_without_and_not_asked_again() {
    let (mock, received) = recording(|body| {
        if text(body).contains("stream_options") {
            json(400, REFUSAL)
        } else {
            sse_pieces(pieces(&without_usage()))
        }
    })
    .await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let sent = chat(STREAM);
    let (head, body) = post(&url, &[], &sent).await;
    assert_eq!(head.status(), 200, "{}", text(&body));
    assert!(head.headers().get("x-sluice-attempts").is_none());
    assert_eq!(text(&body), without_usage());
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "asked, then not");
    assert_eq!(parse(&got[0])["stream_options"]["include_usage"], true);
    assert_eq!(text(&got[1]), sent);
    // Not asked again until a reload.
    let (head, body) = post(&url, &[], &sent).await;
    assert_eq!(head.status(), 200, "{}", text(&body));
    assert!(head.headers().get("x-sluice-attempts").is_none());
    assert_eq!(text(&body), without_usage());
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    assert_eq!(text(&got[2]), sent);
}

// Token limits.

/// Past the burst: 429 `tokens` with OpenAI's token headers, and no upstream request.
#[tokio::test]
async fn a_request_over_the_token_limit_is_refused_with_openai_headers() {
    let (mock, received) = recording(|_| json(200, JSON_WITHOUT_USAGE)).await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &limit(SMALL)), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    // 50 tokens in (200 bytes / 4) and 50 out: the whole burst.
    let body = sized(200);
    let (head, res) = post(&url, &[], &body).await;
    assert_eq!(head.status(), 200, "{}", text(&res));
    let (head, res) = post(&url, &[], &body).await;
    assert_sluice_error(&head, &res, 429, "rate_limit_exceeded");
    assert_eq!(parse(&res)["error"]["type"], "tokens");
    let retry: u64 = header(&head, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(header(&head, "x-ratelimit-limit-tokens"), "600");
    let remaining: u64 = header(&head, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(remaining < 100, "remaining {remaining}");
    let reset = header(&head, "x-ratelimit-reset-tokens");
    assert!(
        reset.ends_with('s') && reset.starts_with(|c: char| c.is_ascii_digit()),
        "reset {reset}"
    );
    assert_eq!(received.lock().unwrap().len(), 1);
}

/// Reported usage settles each estimate down: five near-burst requests pass (else the 2nd is 429).
#[tokio::test]
async fn reported_usage_settles_the_estimate_down() {
    // 30 tokens in (120 bytes / 4) and 50 out.
    let body = sized(120);
    let (mock, _) = recording(|_| json(200, JSON_TWO_TOKENS)).await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &limit(SMALL)), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    for i in 1..=5u32 {
        let (head, res) = post(&url, &[], &body).await;
        assert_eq!(head.status(), 200, "request {i}: {}", text(&res));
        // Settled (and counted) once sluice has let go of the response.
        scrape_until(&proxy, &format!("{i} input tokens"), |m| {
            metric(m, INPUT) == Some(f64::from(i))
        })
        .await;
    }
    let (mock, _) = recording(|_| json(200, JSON_WITHOUT_USAGE)).await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &limit(SMALL)), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    assert_eq!(post(&url, &[], &body).await.0.status(), 200);
    assert_eq!(post(&url, &[], &body).await.0.status(), 429);
}

/// `per = "client"`: each authorization header has its own bucket.
#[tokio::test]
async fn per_client_token_buckets_are_independent() {
    let (mock, received) = recording(|_| json(200, JSON_WITHOUT_USAGE)).await;
    let lines = format!("{SMALL}\nper = \"client\"");
    let proxy = Sidecar::start(&config(&mock.url(), "", &limit(&lines)), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let body = sized(200);
    let a = [("authorization", "Bearer client-a")];
    let b = [("authorization", "Bearer client-b")];
    assert_eq!(post(&url, &a, &body).await.0.status(), 200);
    assert_eq!(post(&url, &a, &body).await.0.status(), 429);
    assert_eq!(post(&url, &b, &body).await.0.status(), 200);
    assert_eq!(received.lock().unwrap().len(), 2);
}

/// `max_wait`: a request that fits after about a second waits and passes.
#[tokio::test]
async fn max_wait_lets_a_token_limited_request_through_after_a_wait() {
    let (mock, received) = recording(|_| json(200, JSON_WITHOUT_USAGE)).await;
    // 100 tokens a second, a burst of 100; each request is estimated at 100.
    let lines = "tokens_per_minute = 6000\nburst = 100\nchars_per_token = 4\n\
                 default_output_tokens = 50\nmax_wait = \"3s\"";
    let proxy = Sidecar::start(&config(&mock.url(), "", &limit(lines)), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let body = sized(200);
    assert_eq!(post(&url, &[], &body).await.0.status(), 200);
    let started = Instant::now();
    let (head, res) = post(&url, &[], &body).await;
    let took = started.elapsed();
    assert_eq!(head.status(), 200, "{}", text(&res));
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(received.lock().unwrap().len(), 2);
}

// Metrics and the access line.

/// An injected stream's usage (7 in, 3 out) and the injection are counted in the metrics.
#[tokio::test]
async fn injected_usage_is_counted_in_the_metrics() {
    let (mock, _) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let (head, body) = post(&proxy.url("/v1/chat/completions"), &[], &chat(STREAM)).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&body), without_usage());
    let m = scrape_until(&proxy, "7 tokens in, 3 out", |m| {
        metric(m, INPUT) == Some(7.0) && metric(m, OUTPUT) == Some(3.0)
    })
    .await;
    let injected = r#"sluice_usage_injected_total{route="r",upstream="up"}"#;
    assert!(metric(&m, injected).is_some_and(|n| n >= 1.0), "{m}");
}

/// A JSON 200 without usage counts as `not_reported`, and no tokens.
#[tokio::test]
async fn a_response_without_usage_is_counted_as_not_reported() {
    let (mock, _) = recording(|_| json(200, JSON_WITHOUT_USAGE)).await;
    let proxy = Sidecar::start(&config(&mock.url(), "", ""), &[]).await;
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], &chat("")).await;
    assert_eq!(head.status(), 200);
    let missing = r#"sluice_usage_missing_total{route="r",upstream="up",reason="not_reported"}"#;
    let m = scrape_until(&proxy, missing, |m| metric(m, missing) == Some(1.0)).await;
    assert!(metric(&m, INPUT).unwrap_or(0.0) == 0.0, "{m}");
}

/// A token-limited route with usage reported observes the estimate's ratio.
#[tokio::test]
async fn a_token_limited_route_observes_its_estimate_ratio() {
    let (mock, _) = chat_upstream().await;
    let proxy = Sidecar::start(
        &config(&mock.url(), "", &limit("tokens_per_minute = 60000")),
        &[],
    )
    .await;
    let (head, _) = post(&proxy.url("/v1/chat/completions"), &[], &chat("")).await;
    assert_eq!(head.status(), 200);
    let count = r#"sluice_token_estimate_ratio_count{route="r"}"#;
    scrape_until(&proxy, count, |m| {
        metric(m, count).is_some_and(|n| n >= 1.0)
    })
    .await;
}

/// Runs sluice as a process with `toml`, POSTs `body` to `path` as request
/// `id`; that request's access line.
async fn access_line(toml: &str, path: &str, body: &str, id: &str) -> String {
    let toml = format!("[server]\nlisten = \"127.0.0.1:0\"\n\n{toml}");
    let mut proxy = Process::start(&toml, &[]).await;
    let (head, res) = post(&proxy.url(path), &[("x-request-id", id)], body).await;
    assert_eq!(head.status(), 200, "{}", text(&res));
    proxy.stop().await;
    let out = proxy.output();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(id) && l.contains("sluice::access"))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    lines[0].to_owned()
}

/// Whether the access line has `field` (`name=value`) as one of its fields.
fn has(line: &str, field: &str) -> bool {
    line.split_whitespace().any(|f| f == field)
}

/// The access line of a streamed chat says the tokens it reported.
#[tokio::test]
async fn the_access_line_has_reported_tokens() {
    let (mock, _) = chat_upstream().await;
    let toml = config(&mock.url(), INJECTING, INJECT);
    let id = "req-usage-reported";
    let line = access_line(&toml, "/v1/chat/completions", &chat(STREAM), id).await;
    for field in ["tokens_in=7", "tokens_out=3", "usage=\"reported\""] {
        assert!(has(&line, field), "{field} missing from: {line}");
    }
}

/// On a token-limited route, a response reporting nothing puts the estimate on the access line.
#[tokio::test]
async fn the_access_line_has_the_estimate_when_nothing_is_reported() {
    let (mock, _) = recording(|_| json(200, JSON_WITHOUT_USAGE)).await;
    let lines = "tokens_per_minute = 60000\nchars_per_token = 4\ndefault_output_tokens = 50";
    let toml = config(&mock.url(), "", &limit(lines));
    let id = "req-usage-estimated";
    let line = access_line(&toml, "/v1/chat/completions", &sized(200), id).await;
    for field in ["tokens_in=50", "tokens_out=50", "usage=\"estimated\""] {
        assert!(has(&line, field), "{field} missing from: {line}");
    }
}

// Anthropic, and streams that end badly.

/// Anthropic: input from `message_start`, output from the last `message_delta` (12, not 17).
#[tokio::test]
async fn anthropic_usage_is_read_from_start_and_last_delta() {
    let (mock, _) = streaming(ANTHROPIC_STREAM.to_owned()).await;
    let proxy = Sidecar::start(&config(&mock.url(), ANTHROPIC, ""), ANTHROPIC_ENV).await;
    let sent = r#"{"model":"claude","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (head, body) = post(&proxy.url("/v1/messages"), &[], sent).await;
    assert_eq!(head.status(), 200, "{}", text(&body));
    assert_eq!(text(&body), ANTHROPIC_STREAM);
    scrape_until(&proxy, "20 tokens in, 12 out", |m| {
        metric(m, INPUT) == Some(20.0) && metric(m, OUTPUT) == Some(12.0)
    })
    .await;
}

/// Malformed events and no `[DONE]`: every byte passes, it ends promptly, the usage counts.
#[tokio::test]
async fn malformed_events_and_no_done_pass_and_the_usage_counts() {
    let stream = format!(
        "{}data: {{broken\n\n{}{}{}{USAGE_CHUNK}",
        CHUNKS[0], CHUNKS[1], "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":\n\n", CHUNKS[2]
    );
    let (mock, _) = streaming(stream.clone()).await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    // The client asked for usage itself: nothing is stripped.
    let sent = chat(r#","stream":true,"stream_options":{"include_usage":true}"#);
    let (head, body) = tokio::time::timeout(
        Duration::from_secs(5),
        post(&proxy.url("/v1/chat/completions"), &[], &sent),
    )
    .await
    .expect("the response ended within 5 s");
    assert_eq!(head.status(), 200);
    assert_eq!(text(&body), stream);
    scrape_until(&proxy, "7 tokens in, 3 out", |m| {
        metric(m, INPUT) == Some(7.0) && metric(m, OUTPUT) == Some(3.0)
    })
    .await;
}

// SSE keep-alive.

const E1: &str = "data: {\"n\":1}\n\n";
const E2_DONE: &str = "data: {\"n\":2}\n\ndata: [DONE]\n\n";
const PING: &str = ": keep-alive\n";
const ANTHROPIC_PING: &str = "event: ping\ndata: {\"type\": \"ping\"}\n\n";

fn keepalive(idle: &str) -> String {
    format!("[routes.sse]\nkeepalive = \"200ms\"\n[routes.timeouts]\nidle = \"{idle}\"\n")
}

/// A pause between events gets keep-alive comments there only; other bytes are untouched.
#[tokio::test]
async fn keepalives_fill_a_pause_between_events() {
    let mock = Mock::start(|_| paused_sse(E1, Duration::from_millis(1200), E2_DONE)).await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &keepalive("3s")), &[]).await;
    let (head, body) = get(&proxy.url("/v1/stream")).await;
    assert_eq!(head.status(), 200);
    let body = text(&body);
    let rest = body.strip_prefix(E1).unwrap_or_else(|| panic!("{body:?}"));
    let (pings, rest) = leading(rest, PING);
    assert!((2..=30).contains(&pings), "{pings} keep-alives: {body:?}");
    assert_eq!(rest, E2_DONE, "{body:?}");
}

/// A pause inside an event gets no keep-alive: it would land in the event.
#[tokio::test]
async fn no_keepalive_inside_an_event() {
    let mock = Mock::start(|_| {
        paused_sse(
            "data: {\"x\":",
            Duration::from_millis(1200),
            "1}\n\ndata: [DONE]\n\n",
        )
    })
    .await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &keepalive("3s")), &[]).await;
    let (head, body) = get(&proxy.url("/v1/stream")).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&body), "data: {\"x\":1}\n\ndata: [DONE]\n\n");
}

/// Keep-alives do not reset the idle clock: silence still ends in the idle error event.
#[tokio::test]
async fn idle_still_fires_under_keepalives() {
    let mock = Mock::start(|_| paused_sse(E1, Duration::from_secs(5), E2_DONE)).await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &keepalive("1s")), &[]).await;
    let started = Instant::now();
    let (head, body) = get(&proxy.url("/v1/stream")).await;
    let took = started.elapsed();
    assert_eq!(head.status(), 200);
    let body = text(&body);
    let rest = body.strip_prefix(E1).unwrap_or_else(|| panic!("{body:?}"));
    let (pings, rest) = leading(rest, PING);
    assert!(pings >= 2, "{pings} keep-alives: {body:?}");
    // One event: one data line and its blank line.
    assert!(
        rest.starts_with("data: {\"error\"")
            && rest.contains("\"code\":\"upstream_idle_timeout\"")
            && rest.ends_with("}\n\n")
            && !rest.trim_end().contains('\n'),
        "{body:?}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

/// An Anthropic route's keep-alive is Anthropic's `ping` event.
#[tokio::test]
async fn anthropic_keepalives_are_ping_events() {
    let mock =
        Mock::start(|_| paused_sse(ANTHROPIC_START, Duration::from_millis(1200), ANTHROPIC_STOP))
            .await;
    let toml = config(&mock.url(), ANTHROPIC, &keepalive("3s"));
    let proxy = Sidecar::start(&toml, ANTHROPIC_ENV).await;
    let sent = r#"{"model":"claude","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (head, body) = post(&proxy.url("/v1/messages"), &[], sent).await;
    assert_eq!(head.status(), 200, "{}", text(&body));
    let body = text(&body);
    let rest = body
        .strip_prefix(ANTHROPIC_START)
        .unwrap_or_else(|| panic!("{body:?}"));
    let (pings, rest) = leading(rest, ANTHROPIC_PING);
    assert!((2..=30).contains(&pings), "{pings} pings: {body:?}");
    assert_eq!(rest, ANTHROPIC_STOP, "{body:?}");
}

// What the review of the first version found.

/// With usage reading off, the chunk sluice asked for is still removed; the
/// upstream is asked for an uncompressed stream it can be removed from.
#[tokio::test]
async fn the_injected_chunk_is_stripped_even_when_usage_is_not_read() {
    let seen_encoding: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = seen_encoding.clone();
    let mock = Mock::start(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let enc = req
                .headers()
                .get("accept-encoding")
                .map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(enc.unwrap_or_default());
            let _ = read_body(req.into_body()).await;
            sse_pieces(pieces(&with_usage()))
        }
    })
    .await;
    let tables = format!("{INJECT}observe = false\n");
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, &tables), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let (head, body) = post(&url, &[("accept-encoding", "gzip, br")], &chat(STREAM)).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&body), without_usage());
    assert_eq!(*seen_encoding.lock().unwrap(), ["identity"]);
}

/// A 400 about the client's own `stream_options` is retried once without
/// sluice's edit, and does not stop sluice asking that upstream later.
#[tokio::test]
async fn a_client_whose_own_stream_options_are_refused_does_not_turn_injection_off() {
    let (mock, received) = recording(|body| {
        if text(body).contains("bogus") {
            return json(400, REFUSAL);
        }
        sse_pieces(pieces(&with_usage()))
    })
    .await;
    let proxy = Sidecar::start(&config(&mock.url(), INJECTING, INJECT), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let own = chat(r#","stream":true,"stream_options":{"include_usage":false,"bogus":1}"#);
    let (head, body) = post(&url, &[], &own).await;
    assert_eq!(head.status(), 400, "{}", text(&body));
    {
        let got = received.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            own.as_bytes(),
            "the second try is the client's own body"
        );
    }
    let (head, body) = post(&url, &[], &chat(STREAM)).await;
    assert_eq!(head.status(), 200);
    assert_eq!(text(&body), without_usage());
    let got = received.lock().unwrap();
    assert_eq!(parse(&got[2])["stream_options"]["include_usage"], true);
}

/// A field a token-limited route reads, given twice, is refused before
/// anything is sent (the estimate and the provider must read the same body).
#[tokio::test]
async fn a_token_field_given_twice_is_refused() {
    let (mock, received) = chat_upstream().await;
    let proxy = Sidecar::start(&config(&mock.url(), "", &limit(SMALL)), &[]).await;
    let url = proxy.url("/v1/chat/completions");
    let (head, body) = post(&url, &[], &chat(r#","max_tokens":5,"max_tokens":5000"#)).await;
    assert_eq!(head.status(), 400);
    assert_eq!(parse(&body)["error"]["code"], "ambiguous_request_body");
    assert!(received.lock().unwrap().is_empty());
}

/// An event stream with a content-length gets keep-alives: the length is
/// dropped and the body framed by chunks, so the client reads it whole.
#[tokio::test]
async fn keepalives_on_a_stream_with_a_length_drop_the_length() {
    let body = format!("{}{DONE}", CHUNKS[0]);
    let len = body.len();
    let tx_body = body.clone();
    let mock = Mock::start(move |_req: Request<Incoming>| {
        let body = tx_body.clone();
        async move {
            let (tx, stream) = channel();
            tokio::spawn(async move {
                let (first, rest) = body.split_at(CHUNKS[0].len());
                let _ = tx.send(Bytes::copy_from_slice(first.as_bytes())).await;
                tokio::time::sleep(Duration::from_millis(600)).await;
                let _ = tx.send(Bytes::copy_from_slice(rest.as_bytes())).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("content-length", len.to_string())
                .body(stream)
                .unwrap()
        }
    })
    .await;
    let tables = "[routes.sse]\nkeepalive = \"100ms\"\n";
    let proxy = Sidecar::start(&config(&mock.url(), "", tables), &[]).await;
    let (head, got) = post(&proxy.url("/v1/chat/completions"), &[], &chat(STREAM)).await;
    assert_eq!(head.status(), 200);
    assert!(
        head.headers().get("content-length").is_none(),
        "{:?}",
        head.headers()
    );
    let got = text(&got);
    let (pings, rest) = leading(got.strip_prefix(CHUNKS[0]).unwrap(), ": keep-alive\n");
    assert!(pings >= 2, "{got:?}");
    assert_eq!(rest, DONE);
}
