//! The shared bucket store (SPEC §11): a limit's GCRA state (its theoretical
//! arrival time) kept in Redis, so that every replica draws on one quota.
//! One atomic script call per admission, timed by Redis's own clock (`TIME`:
//! the replicas' clocks never matter), and each key carries a TTL, so
//! nothing needs cleaning. A flushed script cache (`NOSCRIPT`) is reloaded
//! once, transparently (the redis crate's `Script`).
//!
//! The connection is one multiplexed `ConnectionManager` (or, for a Redis
//! Cluster, the crate's cluster connection, which follows the slots), made
//! in the background: sluice starts whether or not Redis is up, and a call
//! made before it connects is `Unavailable` at once. Every call is bounded
//! by the store's `timeout`; what the caller does past it (`on_error`) is
//! the caller's. The store counts and times its calls, keeps the degraded
//! gauge, and logs once when Redis goes away and once when it is back.
//!
//! A bucket's key is `{prefix}:{kind}:{name:client}`: the route's name and
//! the hash of the client key (never its value) form the hash tag, so a
//! route's request and token buckets for one client share a cluster slot.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisResult, ScriptInvocation};

/// One GCRA step. KEYS[1]: the bucket. ARGV: microseconds per unit, the
/// burst tolerance in microseconds, the cost in units, and how long (ms)
/// the key outlives a full bucket. Returns `{1, 0,
/// ahead}` when admitted, `{0, wait, ahead}` when not, in microseconds
/// (`ahead`: how far the bucket is from full, after the call). A full bucket
/// admits any cost (a charge over the burst never starves), as the local
/// cells do.
const GCRA: &str = r"
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local ahead = tat - now
if ahead < 0 then ahead = 0 end
local next = now + ahead + cost * per
if ahead > 0 and next - now > tolerance then
  local room = tolerance - cost * per
  if room < 0 then room = 0 end
  return {0, math.ceil(ahead - room), math.ceil(ahead)}
end
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + tonumber(ARGV[4]))
return {1, 0, math.ceil(next - now)}
";

/// Settles a charge. KEYS[1]: the bucket. ARGV[1]: microseconds to add (a
/// debt) or, negative, to give back (a refund, never past a full bucket);
/// ARGV[2]: the key's margin past full, in ms.
/// A debt lands on the bucket as it stands: time it has been full since
/// pays part of it, as in the local cells.
const SETTLE: &str = r"
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tat + delta
if delta < 0 then
  if tat <= now then return 0 end
  if new < now then new = now end
end
if new <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + tonumber(ARGV[2]))
return 1
";

/// Why the store gave no verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Not connected (yet, or any more).
    Unavailable,
    /// No answer within `timeout`.
    Timeout,
    /// Redis answered with an error.
    Failed,
}

/// A charge the bucket has no room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Until it would fit.
    pub wait: Duration,
    /// Until the bucket is full.
    pub ahead: Duration,
}

/// The store's verdict on a charge: admitted (with how far the bucket now
/// is from full), or refused.
pub type Verdict = Result<Result<Duration, Refusal>, StoreError>;

/// Which kind of bucket: a key's middle part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[routes.rate_limit]`: requests.
    Requests,
    /// `[routes.token_limit]`: tokens.
    Tokens,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "rq",
            Self::Tokens => "tk",
        }
    }

    /// How long a key outlives its full bucket, ms. A token bucket's state
    /// must still be there when a long stream settles its debt (the local
    /// cells keep theirs); a request bucket is never settled.
    fn margin_ms(self) -> u64 {
        match self {
            Self::Requests => 1_000,
            Self::Tokens => 30 * 60 * 1_000,
        }
    }
}

/// Where the buckets live, and how long a call may take.
#[derive(Clone)]
pub struct StoreConfig {
    /// `redis://` or `rediss://host:port/db`; a cluster's first seed.
    pub url: String,
    pub password: Option<String>,
    /// Prepended to every key.
    pub key_prefix: String,
    pub timeout: Duration,
    /// A Redis Cluster: `url` and `nodes` are seeds, the rest is discovered.
    pub cluster: bool,
    pub nodes: Vec<String>,
    /// PEM roots for `rediss://` (the system's when absent).
    pub ca: Option<Vec<u8>>,
}

impl StoreConfig {
    /// A single Redis at `url`, with the defaults of SPEC §11.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            key_prefix: "sluice".into(),
            timeout: Duration::from_millis(25),
            cluster: false,
            nodes: Vec::new(),
            ca: None,
        }
    }
}

impl std::fmt::Debug for StoreConfig {
    // The password never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// The live connection: one Redis, or a cluster's.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn invoke<T: FromRedisValue>(&mut self, call: &ScriptInvocation<'_>) -> RedisResult<T> {
        match self {
            Self::Single(c) => call.invoke_async(c).await,
            Self::Cluster(c) => call.invoke_async(c).await,
        }
    }
}

/// How to connect, made once from the config (its size does not matter).
#[allow(clippy::large_enum_variant)]
enum Connector {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// Keep-alive probes and a bound on unacknowledged data: a Redis lost
/// without a reset (a node gone, a partition) breaks the connection within
/// seconds, so the manager reconnects instead of timing out every call.
fn tcp() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let probes = TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1));
    redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(probes)
        .set_user_timeout(Duration::from_secs(5))
}

impl Connector {
    fn new(config: &StoreConfig) -> RedisResult<Self> {
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: config.ca.clone(),
        };
        if config.cluster {
            let seeds = std::iter::once(&config.url).chain(&config.nodes);
            let mut b = redis::cluster::ClusterClientBuilder::new(seeds.map(String::as_str))
                .connection_timeout(Duration::from_secs(1))
                // The caller's timeout bounds each call; no retry outlives it.
                .response_timeout(config.timeout.max(Duration::from_millis(100)))
                .retries(1)
                .min_retry_wait(10)
                .max_retry_wait(100)
                .tcp_settings(tcp());
            if let Some(p) = &config.password {
                b = b.password(p);
            }
            if config.ca.is_some() {
                b = b.certs(certs());
            }
            return Ok(Self::Cluster(b.build()?));
        }
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())?;
        info = info.set_tcp_settings(tcp());
        if let Some(p) = &config.password {
            let settings = info.redis_settings().clone().set_password(p.clone());
            info = info.set_redis_settings(settings);
        }
        Ok(Self::Single(match config.ca {
            Some(_) => redis::Client::build_with_tls(info, certs())?,
            None => redis::Client::open(info)?,
        }))
    }

    async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                // The manager reconnects by itself once made.
                let settings = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(None)
                    .set_max_delay(Duration::from_secs(1));
                ConnectionManager::new_with_config(client.clone(), settings)
                    .await
                    .map(Conn::Single)
            }
            Self::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

/// A connection to the shared store, made in the background.
pub struct Store {
    conn: Arc<ArcSwapOption<Conn>>,
    gcra: redis::Script,
    settle: redis::Script,
    prefix: String,
    timeout: Duration,
    /// Up (calls have verdicts) or down: logged when it flips.
    up: AtomicBool,
    /// Calls without a verdict in a row: a lone slow call is not an outage.
    misses: AtomicU32,
    meters: crate::metrics::StoreMeters,
}

/// Timeouts in a row that mark the store down (a refused or broken
/// connection does at once).
const MISSES_DOWN: u32 = 3;

impl std::fmt::Debug for Store {
    // The URL may hold the password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connected", &self.conn.load().is_some())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Starts connecting (retrying each second until it does) and returns
    /// at once. A store that cannot be made (a URL or CA the config check
    /// let through) is logged and never connects: `on_error` applies.
    pub fn start(config: &StoreConfig, meters: crate::metrics::StoreMeters) -> Arc<Self> {
        let store = Arc::new(Self {
            conn: Arc::default(),
            gcra: redis::Script::new(GCRA),
            settle: redis::Script::new(SETTLE),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            up: AtomicBool::new(true),
            misses: AtomicU32::new(0),
            meters,
        });
        // Down until connected.
        store.meters.degraded(true);
        let connector = match Connector::new(config) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(kind = ?e.kind(), "rate_limit_store: cannot be used; on_error applies");
                return store;
            }
        };
        // The task ends when it connects, or when a reload dropped the store.
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            let mut told = false;
            loop {
                let attempt = connector.connect().await;
                let Some(store) = weak.upgrade() else { return };
                match attempt {
                    Ok(c) => {
                        tracing::info!("rate_limit_store: connected");
                        store.conn.store(Some(Arc::new(c)));
                        store.meters.degraded(false);
                        return;
                    }
                    Err(e) if !told => {
                        told = true;
                        tracing::warn!(kind = ?e.kind(), "rate_limit_store: not reachable yet; retrying each second, on_error applies meanwhile");
                    }
                    Err(_) => {}
                }
                drop(store);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        store
    }

    /// Whether a connection has been made (the manager keeps it since).
    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Charges `cost` units to bucket `kind`/`name`/`key` at `per_minute`
    /// with a burst of `burst` units. `Err` when the store gave no verdict
    /// within `timeout`. `key` is a hash (never a client's raw value).
    pub async fn charge(
        &self,
        kind: Kind,
        name: &str,
        key: u64,
        per_minute: u64,
        burst: u64,
        cost: u64,
    ) -> Verdict {
        let per_us = per_unit_us(per_minute);
        let tolerance_us = per_us * burst as f64;
        let mut call = self.gcra.key(self.bucket(kind, name, key));
        call.arg(per_us)
            .arg(tolerance_us)
            .arg(cost)
            .arg(kind.margin_ms());
        let reply = self.call::<(i64, i64, i64)>("charge", &call).await;
        let us = |n: i64| Duration::from_micros(n.max(0).unsigned_abs());
        let verdict = reply.map(|(admitted, wait, ahead)| match admitted {
            1 => Ok(us(ahead)),
            _ => Err(Refusal {
                wait: us(wait),
                ahead: us(ahead),
            }),
        });
        let result = match verdict {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "refused",
            Err(e) => e.as_str(),
        };
        self.meters.count("charge", result);
        verdict
    }

    /// Corrects a charge by `delta` units (a debt when positive, a refund
    /// when negative) on a bucket of `per_minute`.
    pub async fn settle(
        &self,
        kind: Kind,
        name: &str,
        key: u64,
        per_minute: u64,
        delta: i64,
    ) -> Result<(), StoreError> {
        let mut call = self.settle.key(self.bucket(kind, name, key));
        call.arg(per_unit_us(per_minute) * delta as f64)
            .arg(kind.margin_ms());
        let done = self.call::<i64>("settle", &call).await.map(drop);
        self.meters
            .count("settle", done.err().map_or("ok", StoreError::as_str));
        done
    }

    fn bucket(&self, kind: Kind, name: &str, key: u64) -> String {
        // The hash tag ({...}) keeps one route's buckets for a client in
        // one cluster slot.
        format!("{}:{}:{{{name}:{key:x}}}", self.prefix, kind.as_str())
    }

    /// One script call, bounded by `timeout`, timed and logged when the
    /// store's reachability flips.
    async fn call<T: FromRedisValue>(
        &self,
        op: &'static str,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let Some(conn) = self.conn.load_full() else {
            // Not connected yet: the connect task logs and keeps the gauge.
            return Err(StoreError::Unavailable);
        };
        let mut conn = Conn::clone(&conn);
        let start = Instant::now();
        let reply = tokio::time::timeout(self.timeout, conn.invoke::<T>(call)).await;
        self.meters.time(op, start.elapsed());
        let reply = match reply {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                Err(StoreError::Unavailable)
            }
            Ok(Err(e)) => {
                tracing::debug!(kind = ?e.kind(), code = e.code(), "rate_limit_store: error");
                Err(StoreError::Failed)
            }
            Ok(Ok(v)) => Ok(v),
        };
        self.reached(reply.as_ref().map(drop).map_err(|e| *e));
        reply
    }

    /// Logs once each way, and shows it in the degraded gauge: down at a
    /// broken connection or after [`MISSES_DOWN`] timeouts in a row, up at
    /// the next verdict.
    fn reached(&self, outcome: Result<(), StoreError>) {
        let down = match outcome {
            Ok(()) => {
                self.misses.store(0, Relaxed);
                if !self.up.swap(true, Relaxed) {
                    tracing::info!("rate_limit_store: answering again; shared limits resume");
                    self.meters.degraded(!self.up.load(Relaxed));
                }
                return;
            }
            Err(StoreError::Timeout) => self.misses.fetch_add(1, Relaxed) + 1 >= MISSES_DOWN,
            Err(_) => true,
        };
        if down && self.up.swap(false, Relaxed) {
            let reason = outcome.err().map_or("", StoreError::as_str);
            tracing::warn!(
                reason,
                "rate_limit_store: no verdict; on_error applies until it answers again"
            );
            self.meters.degraded(!self.up.load(Relaxed));
        }
    }
}

impl StoreError {
    /// The metric's `result` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Failed => "error",
        }
    }
}

/// A client key's hash for a shared bucket: XXH3 with a fixed seed, an
/// algorithm fixed by its spec, so every replica (whatever it was built
/// with) finds the same bucket; never 0 (the anonymous bucket).
pub fn key_hash(value: &[u8]) -> u64 {
    const SEED: u64 = 0x736c_7569_6365_5f6b; // "sluice_k"
    xxhash_rust::xxh3::xxh3_64_with_seed(value, SEED).max(1)
}

/// Microseconds per unit at `per_minute` (0 counts as 1).
fn per_unit_us(per_minute: u64) -> f64 {
    60_000_000.0 / per_minute.max(1) as f64
}
