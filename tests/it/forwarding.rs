//! Forwarding: method, path, query, base path, hop-by-hop headers, Host,
//! no X-Forwarded-*, key injection, extra headers, x-request-id, h2c, 502.

use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::Full;

use crate::support::*;

const KEY: &str = "sk-upstream-secret";

async fn ok_mock() -> Mock {
    Mock::start(|_| async {
        let mut res = json(200, r#"{"ok":true}"#);
        // Hop-by-hop headers from the upstream must not reach the client.
        let h = res.headers_mut();
        h.insert("connection", "x-upstream-private".parse().unwrap());
        h.insert("x-upstream-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        res
    })
    .await
}

#[tokio::test]
async fn method_path_query_and_base_path_pass_through() {
    let mock = ok_mock().await;
    let proxy = Sidecar::start(&one_route(&format!("{}/openai/", mock.url()), ""), &[]).await;
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(proxy.url("/v1/files/a%20b?purpose=fine-tune&x=%2F"))
            .body(Full::from("{}"))
            .unwrap();
        let (head, _) = collect(send(&client(), req).await).await;
        assert_eq!(head.status(), 200);
        let seen = mock.seen().pop().unwrap();
        assert_eq!(seen.method, method);
        assert_eq!(seen.uri.path(), "/openai/v1/files/a%20b");
        assert_eq!(seen.uri.query(), Some("purpose=fine-tune&x=%2F"));
    }
}

#[tokio::test]
async fn headers_are_cleaned_host_rewritten_and_key_injected() {
    let mock = ok_mock().await;
    let extra = "api_key_env = \"UP_KEY\"\nheaders = { \"OpenAI-Organization\" = \"org-1\", \"x-client-thing\" = \"configured\" }";
    let proxy = Sidecar::start(&one_route(&mock.url(), extra), &[("UP_KEY", KEY)]).await;
    // `Connection: authorization` must not remove the injected key, and the
    // headers it names must not be forwarded.
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .header("host", "sidecar.internal")
        .header("authorization", "Bearer sk-client-placeholder")
        .header("api-key", "client-azure")
        .header("x-api-key", "client-anthropic")
        .header("connection", "keep-alive, authorization, x-secret-hop")
        .header("x-secret-hop", "drop me")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-t")
        .header("upgrade", "websocket")
        .header("x-client-thing", "from client")
        .header("x-custom", "kept")
        .body(Full::from(r#"{"model":"m"}"#))
        .unwrap();
    let (head, _) = collect(send(&client(), req).await).await;
    assert_eq!(head.status(), 200);
    let seen = mock.seen().pop().unwrap();
    let h = &seen.headers;
    assert_eq!(h["authorization"], format!("Bearer {KEY}"));
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert!(!h.contains_key("api-key") && !h.contains_key("x-api-key"));
    assert_eq!(h["host"], mock.addr.to_string());
    for gone in [
        "x-secret-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(!h.contains_key(gone), "{gone} was forwarded");
    }
    for name in h.keys() {
        assert!(!name.as_str().starts_with("x-forwarded"), "{name} added");
        assert_ne!(name, "forwarded");
        assert_ne!(name, "via");
    }
    assert_eq!(h["openai-organization"], "org-1");
    assert_eq!(h["x-client-thing"], "configured");
    assert_eq!(h["x-custom"], "kept");
    // And the upstream's hop-by-hop headers stop at sluice.
    assert!(!head.headers().contains_key("x-upstream-private"));
    assert!(!head.headers().contains_key("keep-alive"));
    assert_eq!(head.headers()["x-end-to-end"], "kept");
}

#[tokio::test]
async fn each_auth_scheme_sets_its_header() {
    let mock = ok_mock().await;
    for (auth, header, value) in [
        ("bearer", "authorization", format!("Bearer {KEY}")),
        ("api-key", "api-key", KEY.to_owned()),
        ("x-api-key", "x-api-key", KEY.to_owned()),
    ] {
        let extra = format!("api_key_env = \"UP_KEY\"\nauth = \"{auth}\"");
        let proxy = Sidecar::start(&one_route(&mock.url(), &extra), &[("UP_KEY", KEY)]).await;
        let req = Request::get(proxy.url("/v1/models"))
            .header("authorization", "Bearer client")
            .header("x-api-key", "client")
            .body(Full::default())
            .unwrap();
        collect(send(&client(), req).await).await;
        let h = mock.seen().pop().unwrap().headers;
        assert_eq!(h[header], value.as_str(), "auth = {auth}");
        for other in ["authorization", "api-key", "x-api-key"]
            .iter()
            .filter(|o| **o != header)
        {
            assert!(!h.contains_key(*other), "auth = {auth} left {other}");
        }
    }
}

#[tokio::test]
async fn key_from_file_is_trimmed_and_injected() {
    let mock = ok_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, format!("{KEY}\n")).unwrap();
    let extra = format!("api_key_file = \"{}\"", path.display());
    let proxy = Sidecar::start(&one_route(&mock.url(), &extra), &[]).await;
    collect(
        send(
            &client(),
            Request::get(proxy.url("/v1/models"))
                .body(Full::default())
                .unwrap(),
        )
        .await,
    )
    .await;
    assert_eq!(
        mock.seen()[0].headers["authorization"],
        format!("Bearer {KEY}")
    );
}

#[tokio::test]
async fn without_a_key_the_clients_auth_passes_through() {
    let mock = ok_mock().await;
    for extra in ["", "auth = \"none\""] {
        let proxy = Sidecar::start(&one_route(&mock.url(), extra), &[]).await;
        let req = Request::get(proxy.url("/v1/models"))
            .header("authorization", "Bearer client-own")
            .header("x-api-key", "client-x")
            .body(Full::default())
            .unwrap();
        collect(send(&client(), req).await).await;
        let h = mock.seen().pop().unwrap().headers;
        assert_eq!(h["authorization"], "Bearer client-own");
        assert_eq!(h["x-api-key"], "client-x");
    }
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_returned() {
    let mock = ok_mock().await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let req = Request::get(proxy.url("/a"))
        .header("x-request-id", "req-abc-123")
        .body(Full::default())
        .unwrap();
    let (head, _) = collect(send(&client(), req).await).await;
    assert_eq!(head.headers()["x-request-id"], "req-abc-123");
    assert_eq!(mock.seen()[0].headers["x-request-id"], "req-abc-123");

    let (head, _) = get(&proxy.url("/b")).await;
    let generated = head.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(mock.seen()[1].headers["x-request-id"], generated.as_str());
    let (head, _) = get(&proxy.url("/c")).await;
    assert_ne!(head.headers()["x-request-id"], generated.as_str());
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let mock = ok_mock().await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let req = Request::post(proxy.url("/v1/chat/completions"))
        .body(Full::from("{}"))
        .unwrap();
    let res = send(&h2c_client(), req).await;
    assert_eq!(res.version(), http::Version::HTTP_2);
    let (head, body) = collect(res).await;
    assert_eq!(head.status(), 200);
    assert_eq!(&body[..], br#"{"ok":true}"#);
    // The upstream is plain HTTP, so sluice spoke HTTP/1.1 to it.
    assert_eq!(mock.seen()[0].version, http::Version::HTTP_11);
    assert_eq!(mock.seen()[0].headers["host"], mock.addr.to_string());
}

#[tokio::test]
async fn connection_refused_is_502_upstream_unavailable() {
    let port = refused_port();
    let proxy = Sidecar::start(&one_route(&format!("http://127.0.0.1:{port}"), ""), &[]).await;
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("could not connect"));
}

#[tokio::test]
async fn a_hanging_connect_is_cut_by_connect_timeout() {
    // A listener that never accepts, with its backlog full: the kernel drops
    // further SYNs, so a connect hangs until the client gives up.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match attempt {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
        assert!(fillers.len() < 64, "backlog never filled");
    }
    let extra = "connect_timeout = \"500ms\"";
    let proxy = Sidecar::start(&one_route(&format!("http://{addr}"), extra), &[]).await;
    let started = Instant::now();
    let (head, body) = get(&proxy.url("/v1/models")).await;
    assert_sluice_error(&head, &body, 502, "upstream_unavailable");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn the_providers_request_id_is_kept_as_x_upstream_request_id() {
    let mock = Mock::start(|_| async {
        let mut res = json(200, "{}");
        res.headers_mut()
            .insert("x-request-id", "req_provider_123".parse().unwrap());
        res
    })
    .await;
    let proxy = Sidecar::start(&one_route(&mock.url(), ""), &[]).await;
    let req = Request::get(proxy.url("/v1/models"))
        .header("x-request-id", "ours-1")
        .body(Full::default())
        .unwrap();
    let (head, _) = collect(send(&client(), req).await).await;
    assert_eq!(head.headers()["x-request-id"], "ours-1");
    assert_eq!(head.headers()["x-upstream-request-id"], "req_provider_123");
}
