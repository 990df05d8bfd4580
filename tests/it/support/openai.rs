//! A mock of the OpenAI endpoints the SDK tests call. It answers 401 unless
//! it sees the upstream key, so every success proves sluice injected it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::mock::{channel, json as json_response, read_body, Mock, MockBody};

pub const UPSTREAM_KEY: &str = "sk-upstream-secret";
pub const TEXT_DELTAS: [&str; 5] = ["Hello", " from", " the", " mock", " upstream."];

/// The JSON bodies of the requests the mock answered, in order (`null`
/// for an empty or non-JSON one).
pub type Bodies = Arc<Mutex<Vec<Value>>>;

pub async fn start() -> Mock {
    Mock::start(|req| handle(req, None)).await
}

/// [`start`], keeping every authorized request's body.
pub async fn start_recording() -> (Mock, Bodies) {
    let bodies = Bodies::default();
    let kept = bodies.clone();
    let mock = Mock::start(move |req| handle(req, Some(kept.clone()))).await;
    (mock, bodies)
}

async fn handle(req: Request<Incoming>, bodies: Option<Bodies>) -> Response<MockBody> {
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v == format!("Bearer {UPSTREAM_KEY}").as_str());
    if !authorized {
        return json_response(
            401,
            r#"{"error":{"message":"bad key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
        );
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body: Value = match read_body(req.into_body()).await {
        Ok(b) if !b.is_empty() => serde_json::from_slice(&b).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    if let Some(bodies) = &bodies {
        bodies.lock().unwrap().push(body.clone());
    }
    let model = body["model"].as_str().unwrap_or("mock-model").to_owned();
    match (method, path.as_str()) {
        (Method::POST, "/v1/chat/completions") if body["stream"] == true => {
            stream(model, body["stream_options"]["include_usage"] == true)
        }
        (Method::POST, "/v1/chat/completions") => json_response(
            200,
            &json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT_DELTAS.concat()}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}
            })
            .to_string(),
        ),
        (Method::POST, "/v1/embeddings") => json_response(
            200,
            &json!({
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
                "model": model, "usage": {"prompt_tokens": 1, "total_tokens": 1}
            })
            .to_string(),
        ),
        (Method::GET, "/v1/models") => json_response(
            200,
            &json!({"object": "list", "data": [
                {"id": "mock-model", "object": "model", "created": 1700000000, "owned_by": "mock"},
                {"id": "mock-embed", "object": "model", "created": 1700000000, "owned_by": "mock"}
            ]})
            .to_string(),
        ),
        _ => json_response(
            404,
            r#"{"error":{"message":"mock: unknown path","type":"invalid_request_error","param":null,"code":null}}"#,
        ),
    }
}

/// Chat deltas as SSE, one event per write with a pause between. With
/// `usage` (the client sent `stream_options.include_usage: true`), as
/// OpenAI does: `"usage": null` on every chunk, then a usage-only chunk
/// (`"choices": []`, 11 tokens in, 5 out) before `[DONE]`.
fn stream(model: String, usage: bool) -> Response<MockBody> {
    let (tx, body) = channel();
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            let mut c = json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
            });
            if usage {
                c["usage"] = Value::Null;
            }
            Bytes::from(format!("data: {c}\n\n"))
        };
        let mut events = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        events.extend(
            TEXT_DELTAS
                .iter()
                .map(|t| chunk(json!({"content": t}), Value::Null)),
        );
        events.push(chunk(json!({}), json!("stop")));
        if usage {
            let c = json!({
                "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000,
                "model": model, "choices": [],
                "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
            });
            events.push(Bytes::from(format!("data: {c}\n\n")));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap()
}
