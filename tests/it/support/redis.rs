//! A real `redis-server` (Debian's package; `scripts/install-sdks.sh`
//! installs it) on a free loopback port, with no persistence; stopped when
//! dropped. Also over TLS, and as a three-master cluster.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Child,
    /// Over TLS: the CA `redis-cli` trusts.
    ca: Option<PathBuf>,
}

impl Redis {
    /// Starts one and waits until it answers `PING`.
    pub fn start() -> Redis {
        Self::start_on(super::refused_port())
    }

    /// On `port` (a restart keeps the port, so clients find it again).
    pub fn start_on(port: u16) -> Redis {
        Self::spawn(port, &["--port", &port.to_string()], None)
    }

    /// TLS only, with `certs`' leaf (for 127.0.0.1); clients need no certificate.
    pub fn start_tls(certs: &super::certs::Certs) -> Redis {
        let port = super::refused_port();
        let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
        let args = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            path(&certs.cert_pem),
            "--tls-key-file".to_owned(),
            path(&certs.key_pem),
            "--tls-ca-cert-file".to_owned(),
            path(&certs.ca_pem),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::spawn(port, &args, Some(certs.ca_pem.clone()))
    }

    fn spawn(port: u16, args: &[&str], ca: Option<PathBuf>) -> Redis {
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): run scripts/install-sdks.sh (the README's test command does)")
            });
        let redis = Redis { port, child, ca };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` against it; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(ca) = &self.ca {
            cmd.args(["--tls", "--cacert", ca.to_str().unwrap()]);
        }
        let out = cmd.args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.cli(&["KEYS", "*"]).lines().map(Into::into).collect();
        keys.sort_unstable();
        keys
    }

    /// Stops it now (the port stays free for a restart).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of three masters (no replicas), each slot assigned.
pub struct Cluster {
    pub nodes: Vec<Redis>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                let (port, bus) = (super::refused_port(), super::refused_port());
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                let args = [
                    "--port".to_owned(),
                    port.to_string(),
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-port".to_owned(),
                    bus.to_string(),
                    "--cluster-config-file".to_owned(),
                    conf.to_str().unwrap().to_owned(),
                    "--dir".to_owned(),
                    dir.path().to_str().unwrap().to_owned(),
                ];
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Redis::spawn(port, &args, None)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Cluster { nodes, _dir: dir }
    }

    /// Every node's URL: the seeds.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// Every key on every node, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.nodes.iter().flat_map(Redis::keys).collect();
        keys.sort_unstable();
        keys
    }
}
