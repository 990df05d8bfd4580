//! The processes under test: starting them pinned to a CPU, reading their
//! CPU time and memory from /proc, and stopping them.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running process tree (nginx's master and worker count together).
pub struct Proc {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
}

/// The CPUs to pin to, the first two this process may use: the proxy on
/// one, the load and mock on the other. `None` where there are fewer than
/// two or taskset is missing.
pub fn cpus() -> Option<(usize, usize)> {
    let taskset = Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    let mut allowed = cpu_list(list.trim()).into_iter();
    match (allowed.next(), allowed.next()) {
        (Some(a), Some(b)) if taskset => Some((a, b)),
        _ => None,
    }
}

/// "0-2,5" as [0, 1, 2, 5].
fn cpu_list(list: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) {
            out.extend(lo..=hi);
        }
    }
    out
}

/// Pins this process (before it starts any thread) to `cpu`.
pub fn pin_self(cpu: usize) -> io::Result<()> {
    let status = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other("taskset failed"))
    }
}

/// A loopback port free at the time of asking.
pub fn free_addr() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

pub struct Spawn<'a> {
    pub name: &'static str,
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    pub cpu: Option<usize>,
    pub log: PathBuf,
    pub addr: SocketAddr,
}

impl Proc {
    pub fn start(s: Spawn<'_>) -> io::Result<Proc> {
        let mut cmd = match s.cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(s.program);
                c
            }
            None => Command::new(s.program),
        };
        let log = fs::File::create(&s.log)?;
        cmd.args(&s.args)
            .envs(s.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::other(format!("cannot start {}: {e}", s.program.display())))?;
        let mut p = Proc {
            name: s.name,
            addr: s.addr,
            child,
        };
        // LiteLLM takes 7-9 s to import and start, more on a busy CPU.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(s.addr).is_ok() {
                return Ok(p);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = fs::read_to_string(&s.log).unwrap_or_default();
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before listening:\n{log}",
                    s.name
                )));
            }
            if Instant::now() > deadline {
                p.stop();
                return Err(io::Error::other(format!(
                    "{} never listened on {}",
                    s.name, s.addr
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pids of this process and all its descendants.
    fn tree(&self) -> Vec<u32> {
        let mut pids = vec![self.pid()];
        let mut parents: Vec<(u32, u32)> = Vec::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Some(stat) = read_stat(pid) {
                    parents.push((pid, stat.ppid));
                }
            }
        }
        let mut i = 0;
        while i < pids.len() {
            let parent = pids[i];
            pids.extend(
                parents
                    .iter()
                    .filter(|(_, pp)| *pp == parent)
                    .map(|(p, _)| *p),
            );
            i += 1;
        }
        pids
    }

    /// User plus system CPU time of the whole tree, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.tree()
            .into_iter()
            .filter_map(read_stat)
            .map(|s| s.utime + s.stime)
            .sum()
    }

    /// Resident memory of the whole tree, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.tree()
            .into_iter()
            .filter_map(|pid| {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }

    /// SIGTERM, then SIGKILL if it is still there after 10 s.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields after the name, from 3 (state): ppid is 4, utime 14, stime 15.
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

/// Clock ticks per second, for CPU times from /proc.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// sluice's config for the run: one route with the defaults an operator
/// gets (retries on, no rate limit), the key injected, access log on.
pub fn sluice_config(listen: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"[server]
listen = "{listen}"
admin_listen = ""
shutdown_grace = "2s"

[log]
level = "info"

[upstreams.mock]
url = "http://{upstream}"
api_key_env = "SLUICE_BENCH_KEY"

[[routes]]
name = "openai"
path_prefix = "/v1"
upstream = "mock"
"#
    )
}

/// The same config with the route reading the body's model: the client's
/// `gpt-4o-mini` is an alias rewritten to the mock's own name.
pub fn model_routed(config: &str) -> String {
    let models = "[models.\"gpt-4o-mini\"]\ndeployments = [{ upstream = \"mock\", model = \"gpt-4o-mini-2024-07-18\" }]\n\n[[routes]]";
    config.replacen("[[routes]]", models, 1) + "model_routing = true\n"
}

/// A token limit that never refuses, for `sluice-token-limit`: every
/// request's estimate is charged and settled against the reported usage.
pub const TOKEN_LIMIT: &str =
    "[routes.token_limit]\ntokens_per_minute = 100000000000\nburst = 1000000000\n";

/// The same config with usage injection: the upstream takes
/// `stream_options`, and the route adds it to every stream whose client
/// did not ask, then takes out the usage chunk it caused.
pub fn usage_injected(config: &str) -> String {
    config.replacen(
        "api_key_env = \"SLUICE_BENCH_KEY\"\n",
        "api_key_env = \"SLUICE_BENCH_KEY\"\ninject_usage = true\n",
        1,
    ) + "[routes.usage]\ninject = \"always\"\n"
}

/// The same config with the access log off (`sluice::access=off`).
pub fn logs_off(config: &str) -> String {
    config.replacen("level = \"info\"", "level = \"info,sluice::access=off\"", 1)
}

/// nginx as a streaming reverse proxy: one worker, keep-alive upstream,
/// no buffering, the key injected, access log on (or `off`).
pub fn nginx_config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    access_log: bool,
) -> String {
    let d = dir.display();
    let access = if access_log {
        format!("{d}/access.log")
    } else {
        "off".into()
    };
    format!(
        r#"worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 20000;
}}
http {{
    access_log {access};
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream mock {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer sk-bench-not-a-real-key";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"#
    )
}

/// An LLM gateway installed by bench/install-gateways.sh under `dir`
/// (target/gateways), as a user would run it for this job: one
/// OpenAI-compatible upstream (the mock), its own retries at their
/// defaults, the provider key injected.
pub struct Gateway {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    /// Header lines each request needs.
    pub headers: String,
    pub version: String,
}

/// LiteLLM's proxy (PyPI `litellm[proxy]`), if installed: one process
/// (uvicorn, `--num_workers 1`), a `model_list` entry for the mock, its
/// access log at its default (on). 1.108 refuses to start without a
/// master key; the client's `Bearer sk-client` is it.
pub fn litellm(
    dir: &Path,
    work: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> Option<Gateway> {
    let program = dir.join("litellm-venv/bin/litellm");
    if !program.is_file() {
        return None;
    }
    let config = work.join("litellm.yaml");
    let yaml = format!(
        "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n\
         \x20     api_base: http://{upstream}/v1\n      api_key: sk-bench-not-a-real-key\n\
         general_settings:\n  master_key: sk-client\n"
    );
    fs::write(&config, yaml).ok()?;
    let version = Command::new(dir.join("litellm-venv/bin/python"))
        .args([
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Some(Gateway {
        name: "litellm",
        program,
        args: vec![
            "--config".into(),
            config.display().to_string(),
            "--host".into(),
            listen.ip().to_string(),
            "--port".into(),
            listen.port().to_string(),
            "--num_workers".into(),
            "1".into(),
        ],
        // The bundled cost map: no fetch from the internet at start.
        env: vec![("LITELLM_LOCAL_MODEL_COST_MAP", "True".into())],
        headers: String::new(),
        version,
    })
}

/// Portkey's gateway (npm `@portkey-ai/gateway`), if installed: one Node
/// process; the upstream and its key in the `x-portkey-config` header of
/// each request, and `x-bench-stream` forwarded (Portkey drops unknown
/// body fields). No retries at its defaults.
pub fn portkey(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> Option<Gateway> {
    let package = dir.join("portkey/node_modules/@portkey-ai/gateway");
    let script = package.join("build/start-server.js");
    if !script.is_file() {
        return None;
    }
    let version = fs::read_to_string(package.join("package.json"))
        .ok()
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_default();
    let config = format!(
        r#"{{"provider":"openai","custom_host":"http://{upstream}/v1","api_key":"sk-bench-not-a-real-key"}}"#
    );
    Some(Gateway {
        name: "portkey",
        program: PathBuf::from("node"),
        // Only the `--port=N` form is read; it listens on every interface.
        args: vec![
            script.display().to_string(),
            format!("--port={}", listen.port()),
            "--headless".into(),
        ],
        env: vec![],
        headers: format!(
            "x-portkey-config: {config}\r\nx-portkey-forward-headers: x-bench-stream\r\n"
        ),
        version,
    })
}

/// The nginx to compare with, if there is one.
pub fn find_nginx(given: Option<PathBuf>) -> Option<PathBuf> {
    if given.is_some() {
        return given;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

pub fn nginx_version(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .and_then(|s| s.split('/').nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0-1"), [0, 1]);
        assert_eq!(cpu_list("2,4-5"), [2, 4, 5]);
        assert_eq!(cpu_list("3"), [3]);
    }

    #[test]
    fn reads_our_own_stat() {
        let s = read_stat(std::process::id()).unwrap();
        assert!(s.ppid > 0);
    }
}
