//! Under systemd: sd_notify states on a real NOTIFY_SOCKET, the soft
//! open-file limit raised to the hard one, and the runtime sized to the
//! CPUs the process may use.

use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::support::*;

fn config(mock: &Mock) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}",
        one_route(&mock.url(), "")
    )
}

async fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("a notification within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// SIGHUP: sluice reports RELOADING=1, then READY=1 (the file refused or
/// not). The body of a GET served afterwards.
async fn reload(proxy: &Process, socket: &UnixDatagram) -> bytes::Bytes {
    proxy.signal("HUP");
    assert_reloading(&next_message(socket).await);
    assert_eq!(next_message(socket).await.trim(), "READY=1");
    get(&proxy.url("/v1/x")).await.1
}

#[tokio::test]
async fn ready_once_listening_and_stopping_on_drain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let mut proxy =
        Process::start(&config(&mock), &[("NOTIFY_SOCKET", path.to_str().unwrap())]).await;
    assert_eq!(next_message(&socket).await.trim(), "READY=1");
    // Ready means serving.
    assert_eq!(get(&proxy.url("/v1/models")).await.0.status(), 200);
    proxy.signal("TERM");
    assert_eq!(next_message(&socket).await.trim(), "STOPPING=1");
    assert_eq!(proxy.exit_within(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let mock = Mock::start(|_| async { json(200, "{}") }).await;
    let mut proxy = Process::start_with_soft_nofile(&config(&mock), &[], Some(256)).await;
    let pid = proxy.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised: {line}");
    assert_ne!(nums[0], "256", "{line}");
    proxy.stop().await;
    assert!(
        proxy.output().contains(&format!("limit={}", nums[1])),
        "{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_between_reloading_and_ready_and_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let first = Mock::start(|_| async { json(200, r#"{"from":"first"}"#) }).await;
    let second = Mock::start(|_| async { json(200, r#"{"from":"second"}"#) }).await;
    let mut proxy = Process::start(
        &config(&first),
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .await;
    assert_eq!(next_message(&socket).await.trim(), "READY=1");

    let written = std::fs::read_to_string(proxy.config_path()).unwrap();
    std::fs::write(
        proxy.config_path(),
        written.replace(&first.url(), &second.url()),
    )
    .unwrap();
    assert_eq!(&reload(&proxy, &socket).await[..], br#"{"from":"second"}"#);

    std::fs::write(
        proxy.config_path(),
        "[server]\nlisten = \"127.0.0.1:0\"\nbogus = 1\n",
    )
    .unwrap();
    assert_eq!(
        &reload(&proxy, &socket).await[..],
        br#"{"from":"second"}"#,
        "the old config stays"
    );
    proxy.signal("TERM");
    assert_eq!(next_message(&socket).await.trim(), "STOPPING=1");
    assert_eq!(proxy.exit_within(Duration::from_secs(10)).await, Some(0));
    let out = proxy.output();
    assert!(out.contains("config reloaded"), "{out}");
    assert!(
        out.contains("reload refused, keeping the running config")
            && out.contains("sluice.toml:3:1: server.bogus: unknown field"),
        "{out}"
    );
}

/// RELOADING=1 with the MONOTONIC_USEC that Type=notify-reload units need.
fn assert_reloading(message: &str) {
    let mut lines = message.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{message}");
    let usec = lines.next().and_then(|l| l.strip_prefix("MONOTONIC_USEC="));
    assert!(usec.is_some_and(|u| u.parse::<u64>().is_ok()), "{message}");
}

#[tokio::test]
async fn one_allowed_cpu_gets_a_single_threaded_runtime() {
    let mock = Mock::start(|_| async { json(200, r#"{"ok":true}"#) }).await;
    let mut proxy = Process::start_on_one_cpu(&config(&mock), &[]).await;
    // The main thread runs everything: no worker threads to hand work to.
    assert_eq!(proxy.threads(), 1);
    let (res, body) = get(&proxy.url("/v1/models")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(&body[..], br#"{"ok":true}"#);
    assert_eq!(proxy.threads(), 1);
    proxy.stop().await;

    // With every CPU of this machine (two or more here), one worker each.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    if cpus > 1 {
        let mut proxy = Process::start(&config(&mock), &[]).await;
        assert!(proxy.threads() > cpus, "{} threads", proxy.threads());
        proxy.stop().await;
    }
}
