//! Routes: file order, first match, segment-boundary prefixes, methods,
//! strip_prefix, and 404 route_not_found in OpenAI's shape.

use http::Request;
use http_body_util::Full;

use crate::support::*;

/// Each mock answers with its own name, so the body tells which route won.
async fn named(name: &'static str) -> Mock {
    Mock::start(move |_| async move { json(200, &format!(r#"{{"upstream":"{name}"}}"#)) }).await
}

async fn three_routes() -> (Sidecar, Mock, Mock, Mock) {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let toml = format!(
        r#"
[upstreams.a]
url = "{}"
[upstreams.b]
url = "{}/base"
[upstreams.c]
url = "{}"

[[routes]]
name = "posts-to-a"
path_prefix = "/v1/chat"
methods = ["post"]
upstream = "a"

[[routes]]
name = "groq"
path_prefix = "/groq/"
strip_prefix = true
upstream = "b"

[[routes]]
name = "v1"
path_prefix = "/v1"
upstream = "c"
"#,
        a.url(),
        b.url(),
        c.url()
    );
    (Sidecar::start(&toml, &[]).await, a, b, c)
}

async fn which(proxy: &Sidecar, method: &str, path: &str) -> String {
    let req = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .body(Full::default())
        .unwrap();
    let (head, body) = collect(send(&client(), req).await).await;
    if head.status() == 404 {
        assert_sluice_error(&head, &body, 404, "route_not_found");
        return "404".into();
    }
    assert_eq!(head.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["upstream"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn first_match_in_file_order_with_methods() {
    let (proxy, _a, _b, _c) = three_routes().await;
    // POST matches the first route; GET falls through to the later /v1 route.
    assert_eq!(which(&proxy, "POST", "/v1/chat/completions").await, "a");
    assert_eq!(which(&proxy, "GET", "/v1/chat/completions").await, "c");
    assert_eq!(which(&proxy, "POST", "/v1/embeddings").await, "c");
}

#[tokio::test]
async fn prefixes_match_on_segment_boundaries() {
    let (proxy, _a, _b, _c) = three_routes().await;
    assert_eq!(which(&proxy, "GET", "/v1").await, "c");
    assert_eq!(which(&proxy, "GET", "/v1/").await, "c");
    assert_eq!(which(&proxy, "GET", "/v1/models").await, "c");
    // "/v1x" shares the characters but not the segment.
    assert_eq!(which(&proxy, "GET", "/v1x/models").await, "404");
    assert_eq!(which(&proxy, "POST", "/v1/chatty").await, "c");
    assert_eq!(which(&proxy, "GET", "/").await, "404");
    // A prefix written with a trailing slash behaves the same.
    assert_eq!(which(&proxy, "GET", "/groq").await, "b");
    assert_eq!(which(&proxy, "GET", "/groqx").await, "404");
}

#[tokio::test]
async fn strip_prefix_removes_the_prefix_and_joins_the_base_path() {
    let (proxy, _a, b, _c) = three_routes().await;
    assert_eq!(which(&proxy, "GET", "/groq/v1/models?limit=2").await, "b");
    assert_eq!(which(&proxy, "GET", "/groq").await, "b");
    let seen = b.seen();
    assert_eq!(seen[0].uri.path(), "/base/v1/models");
    assert_eq!(seen[0].uri.query(), Some("limit=2"));
    assert_eq!(seen[1].uri.path(), "/base");
}

#[tokio::test]
async fn unmatched_request_is_404_route_not_found_and_nothing_is_sent() {
    let (proxy, a, b, c) = three_routes().await;
    let (head, body) = get(&proxy.url("/nothing/here")).await;
    assert_sluice_error(&head, &body, 404, "route_not_found");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(head.headers().contains_key("x-request-id"));
    assert!(a.seen().is_empty() && b.seen().is_empty() && c.seen().is_empty());
}

#[tokio::test]
async fn dot_segments_are_refused_before_routing() {
    // "/v1/chat/../files" would match the POST-only chat route and reach
    // /v1/files upstream with the route's key.
    let (proxy, a, b, c) = three_routes().await;
    for path in [
        "/v1/chat/../files",
        "/v1/chat/%2e%2e/files",
        "/v1/chat/%2E./files",
        "/groq/../x",
        "/v1/./models",
    ] {
        let req = Request::post(proxy.url(path))
            .body(Full::default())
            .unwrap();
        let (head, body) = collect(send(&client(), req).await).await;
        assert_sluice_error(&head, &body, 400, "bad_request");
    }
    assert!(a.seen().is_empty() && b.seen().is_empty() && c.seen().is_empty());
}
