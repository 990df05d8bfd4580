//! Test support: a mock upstream, sluice in-process or as a process, clients.

pub mod certs;
pub mod mock;
pub mod openai;
#[cfg(feature = "otel")]
pub mod otlp;
pub mod raw;
pub mod redis;
pub mod upstream;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};

pub use mock::{channel, json, BodyTx, Mock, MockBody};

/// A sluice served in this process on 127.0.0.1:0 (admin too); stops when dropped.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    reloads: tokio::sync::mpsc::UnboundedSender<sluice::Reload>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Sidecar {
    /// Starts sluice with `toml` (the `listen` keys are ignored: ports are
    /// chosen here). `env` answers `api_key_env` look-ups.
    pub async fn start(toml: &str, env: &[(&str, &str)]) -> Sidecar {
        // Logs show with a failing test's output (RUST_LOG=debug for more).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .with_test_writer()
            .try_init();
        let config = parse(toml, env).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let data = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (data.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (reloads, rx) = tokio::sync::mpsc::unbounded_channel();
        let listeners = sluice::Listeners {
            data,
            admin: Some(admin),
        };
        tokio::spawn(sluice::run(
            config,
            listeners,
            async {
                let _ = stopped.await;
            },
            rx,
        ));
        Sidecar {
            addr,
            admin: admin_addr,
            reloads,
            _stop: stop,
        }
    }

    /// sluice in front of the upstream at `url` (one catch-all route) with
    /// these `[server]` lines.
    pub async fn in_front_of(url: &str, server: &str) -> Sidecar {
        Sidecar::start(&sluice_toml(server, url, ""), &[]).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Hands sluice a new config, as SIGHUP does (`Err` for a refused file).
    pub fn reload(&self, toml: &str, env: &[(&str, &str)]) {
        self.reloads.send(parse(toml, env)).unwrap();
    }
}

/// Parses a config as `sluice` would, with a fake environment.
pub fn parse(
    toml: &str,
    env: &[(&str, &str)],
) -> Result<sluice::Config, sluice::config::ConfigErrors> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    sluice::Config::parse(
        toml,
        "test.toml",
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &lookup,
    )
}

/// A minimal config: one upstream `up` at `url` and one catch-all route.
pub fn one_route(url: &str, upstream_extra: &str) -> String {
    format!(
        "[upstreams.up]\nurl = \"{url}\"\n{upstream_extra}\n\n[[routes]]\nname = \"all\"\nupstream = \"up\"\n"
    )
}

/// A whole config: `[server]` with these lines, [`one_route`] to `url`, and
/// the route's own tables (`[routes.retry]`...) in `route`.
pub fn sluice_toml(server: &str, url: &str, route: &str) -> String {
    format!("[server]\n{server}\n\n{}{route}\n", one_route(url, ""))
}

/// A body whose every byte depends on its position (a prime period, 89),
/// so a lost, repeated or reordered piece shows; printable, so it reads as
/// text too.
pub fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| b'!' + (i % 89) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A loopback port nothing listens on (bound, then released).
pub fn refused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One HTTP/1.1 client connection to `addr` (to stream a request body, or
/// to know which requests share a connection).
pub async fn h1_connection<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// An h2c (prior knowledge) client.
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Starts a POST to `url` whose body the test then feeds through the
/// sender (the client sends it chunked: its length is unknown up front).
/// The response comes on the handle; a failed request panics there.
pub fn post_streamed(url: &str) -> (BodyTx, tokio::task::JoinHandle<Response<Incoming>>) {
    let (tx, body) = channel();
    let req = Request::post(url).body(body).unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http::<MockBody>();
    let res = tokio::spawn(async move { client.request(req).await.expect("request failed") });
    (tx, res)
}

/// Sends a request with a small body and returns the response, body unread.
pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Response<Incoming> {
    tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("response within 20 s")
        .expect("request failed")
}

/// `GET url`, the response with its body unread (for streams).
pub async fn open(url: &str) -> Response<Incoming> {
    send(&client(), Request::get(url).body(Full::default()).unwrap()).await
}

/// A `text/event-stream` response around `body`.
pub fn sse(body: MockBody) -> Response<MockBody> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

/// `GET url`, the whole response.
pub async fn get(url: &str) -> (Response<()>, Bytes) {
    let res = send(&client(), Request::get(url).body(Full::default()).unwrap()).await;
    collect(res).await
}

/// Splits a response into its head and whole body.
pub async fn collect(res: Response<Incoming>) -> (Response<()>, Bytes) {
    let (parts, body) = res.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .expect("body within 60 s")
        .expect("body complete")
        .to_bytes();
    (Response::from_parts(parts, ()), body)
}

/// Asserts sluice's own error: status, OpenAI-shaped body, x-sluice-error.
pub fn assert_sluice_error(head: &Response<()>, body: &[u8], status: u16, code: &str) {
    assert_eq!(
        head.status(),
        status,
        "body: {}",
        String::from_utf8_lossy(body)
    );
    assert_eq!(head.headers()["x-sluice-error"], code);
    assert_eq!(head.headers()["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    assert_eq!(v["error"]["code"], code);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("sluice: "));
    assert!(v["error"]["type"].is_string());
    assert!(v["error"]["param"].is_null());
}

/// The `sluice` binary run as a child process with a config file in a
/// temporary directory; its stderr is captured. Killed when dropped.
pub struct Process {
    pub addr: SocketAddr,
    /// The admin listener, when the config has one.
    pub admin: Option<SocketAddr>,
    pub child: tokio::process::Child,
    _dir: tempfile::TempDir,
    output: Arc<Mutex<String>>,
}

impl Process {
    /// Writes `toml` (which must set `listen = "127.0.0.1:0"`) and starts sluice.
    pub async fn start(toml: &str, env: &[(&str, &str)]) -> Process {
        Self::start_with_soft_nofile(toml, env, None).await
    }

    /// As `start`, with the soft open-file limit lowered first (through the
    /// shell's ulimit, then exec: the child is sluice itself).
    pub async fn start_with_soft_nofile(
        toml: &str,
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> Process {
        let script = nofile.map(|n| format!("ulimit -Sn {n} && exec \"$0\" \"$@\""));
        Self::start_via(toml, env, script).await
    }

    /// As `start`, under an open-file limit of `n`, hard and soft (sluice
    /// raises the soft limit to the hard one itself).
    pub async fn start_with_nofile(toml: &str, env: &[(&str, &str)], n: u64) -> Process {
        let script = format!("ulimit -Sn {n} && ulimit -Hn {n} && exec \"$0\" \"$@\"");
        Self::start_via(toml, env, Some(script)).await
    }

    /// As `start`, allowed one CPU only (taskset), as a pinned sidecar or a
    /// 1-CPU cgroup quota leaves it.
    pub async fn start_on_one_cpu(toml: &str, env: &[(&str, &str)]) -> Process {
        // The first CPU this test may use (not always CPU 0 in a container).
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list");
        let cpu: String = list
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let script = format!("exec taskset -c {cpu} \"$0\" \"$@\"");
        Self::start_via(toml, env, Some(script)).await
    }

    /// Starts sluice directly, or through `bash -c script` with sluice as
    /// `$0` (the script ends by exec-ing it, so the child is sluice).
    async fn start_via(toml: &str, env: &[(&str, &str)], script: Option<String>) -> Process {
        let dir = tempfile::tempdir().unwrap();
        // Parallel tests must not share the default admin port.
        let toml = if toml.contains("admin_listen") {
            toml.to_owned()
        } else {
            toml.replacen(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
                1,
            )
        };
        std::fs::write(dir.path().join("sluice.toml"), &toml).unwrap();
        let mut cmd = match script {
            None => tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice")),
            Some(script) => {
                let mut c = tokio::process::Command::new("bash");
                c.arg("-c").arg(script).arg(env!("CARGO_BIN_EXE_sluice"));
                c
            }
        };
        let mut child = cmd
            .arg("--config")
            .arg(dir.path().join("sluice.toml"))
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let out = output.clone();
        let admin = Arc::new(Mutex::new(None));
        let admin_out = admin.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(i) = line.find("admin listening on http://") {
                    let rest = &line[i + "admin listening on http://".len()..];
                    let addr: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                        .collect();
                    *admin_out.lock().unwrap() = addr.parse().ok();
                } else if let Some(i) = line.find("listening on http") {
                    let rest = &line[i..];
                    let addr: Option<String> = rest.split("://").nth(1).map(|s| {
                        s.chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c))
                            .collect()
                    });
                    if let (Some(tx), Some(addr)) = (tx.take(), addr) {
                        let _ = tx.send(addr);
                    }
                }
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
        let mut stdout = child.stdout.take().unwrap();
        let out = output.clone();
        tokio::spawn(async move {
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut s).await;
            out.lock().unwrap().push_str(&s);
        });
        let addr = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .unwrap_or_else(|_| panic!("sluice did not start:\n{}", output.lock().unwrap()))
            .unwrap_or_else(|_| panic!("sluice exited:\n{}", output.lock().unwrap()));
        // The admin line comes first; give the reader a moment if it lags.
        for _ in 0..50 {
            if admin.lock().unwrap().is_some() || !toml.contains("admin_listen = \"127.0.0.1:0\"") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let admin = *admin.lock().unwrap();
        Process {
            admin,
            addr: addr.parse().unwrap(),
            child,
            _dir: dir,
            output,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The config file sluice was started with (rewrite it, then SIGHUP).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("sluice.toml")
    }

    /// Everything sluice wrote so far (stderr, then stdout once it closed).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// User and system CPU time used so far, from /proc.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.child.id().expect("running");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // After the command name in parentheses: utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        let ticks = 100; // USER_HZ on Linux
        Duration::from_millis((fields[0] + fields[1]) * 1000 / ticks)
    }

    /// The number of threads, from /proc.
    pub fn threads(&self) -> u64 {
        self.status_field("Threads:")
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        self.status_field("VmRSS:")
    }

    /// A number from /proc/PID/status (a "kB" unit dropped).
    fn status_field(&self, name: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    }

    /// Sends a signal ("TERM", "INT", ...) without waiting.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `bound` for the process to exit; its exit code.
    pub async fn exit_within(&mut self, bound: Duration) -> Option<i32> {
        let status = tokio::time::timeout(bound, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("sluice still running after {bound:?}"))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        status.code()
    }

    /// SIGTERM, then wait for exit; returns the exit code.
    pub async fn stop(&mut self) -> Option<i32> {
        let pid = self.child.id().expect("running");
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("sluice exits after SIGTERM")
            .unwrap();
        // Let the reader tasks drain the pipes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        status.code()
    }
}

/// Runs `sluice ARGS` to completion: (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A series `name{a="x",b="y"}` as its name (`_total` dropped) and its
/// labels sorted: the same key whatever order the labels are written in.
pub fn series_key(series: &str) -> (&str, Vec<&str>) {
    let (name, labels) = series.split_once('{').unwrap_or((series, ""));
    let mut labels: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty())
        .collect();
    labels.sort_unstable();
    (name.strip_suffix("_total").unwrap_or(name), labels)
}

/// The samples of a Prometheus or OpenMetrics text scrape: series, value.
fn samples(scrape: &str) -> impl Iterator<Item = (&str, &str)> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (s, rest) = match l.find('}') {
                Some(i) => l.split_at(i + 1),
                None => l.split_once(' ')?,
            };
            Some((s.trim(), rest.split_whitespace().next()?))
        })
}

/// The value of `series` (its name and labels, in any order) in a scrape.
pub fn metric(scrape: &str, series: &str) -> Option<f64> {
    let want = series_key(series);
    samples(scrape)
        .find(|(s, _)| series_key(s) == want)
        .and_then(|(_, v)| v.parse().ok())
}

/// The sum of every series named `name`, whatever its labels.
pub fn family_sum(scrape: &str, name: &str) -> f64 {
    let name = series_key(name).0;
    samples(scrape)
        .filter(|(s, _)| series_key(s).0 == name)
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}
