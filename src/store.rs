//! The shared bucket store (SPEC §11): a limit's GCRA state (its theoretical
//! arrival time) kept in Redis, so that every replica draws on one quota.
//! One atomic script call per admission, timed by Redis's own clock (`TIME`:
//! the replicas' clocks never matter), and each key carries a TTL, so
//! nothing needs cleaning. A flushed script cache (`NOSCRIPT`) is reloaded
//! once, transparently (the redis crate's `Script`).
//!
//! The connection is one multiplexed `ConnectionManager`, made in the
//! background: sluice starts whether or not Redis is up, and a call made
//! before it connects is `Unavailable` at once. Every call is bounded by
//! the store's `timeout`; what the caller does past it (`on_error`) is the
//! caller's.
//!
//! Used by `shared = true` request limits (`limit.rs`); token buckets,
//! `rediss://` and Redis Cluster come next (issue 17 continues).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// One GCRA step. KEYS[1]: the bucket. ARGV: microseconds per unit, the
/// burst tolerance in microseconds, the cost in units. Returns `{1, 0}`
/// when admitted, `{0, wait_us}` when not. A full bucket admits any cost
/// (a charge over the burst never starves), as the local cells do.
const GCRA: &str = r"
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
  return {0, math.ceil(next - tolerance - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + 1000)
return {1, 0}
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

/// Where the buckets live, and how long a call may take.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `redis://host:port/db` (the password, if any, in it or below).
    pub url: String,
    pub password: Option<String>,
    /// Prepended to every key: `{prefix}:{bucket:key}`.
    pub key_prefix: String,
    pub timeout: Duration,
}

/// A connection to the shared store, made in the background.
pub struct Store {
    conn: Arc<ArcSwapOption<ConnectionManager>>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
}

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
    /// at once. A bad URL is the config check's to refuse.
    pub fn start(config: &StoreConfig) -> Result<Arc<Self>, redis::RedisError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())?;
        if let Some(p) = &config.password {
            let settings = info.redis_settings().clone().set_password(p.clone());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let store = Arc::new(Self {
            conn: Arc::default(),
            script: redis::Script::new(GCRA),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
        });
        let conn = store.conn.clone();
        // The manager reconnects by itself once made; until then, retry.
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_max_delay(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                match ConnectionManager::new_with_config(client.clone(), settings.clone()).await {
                    Ok(m) => {
                        tracing::info!("rate_limit_store: connected");
                        conn.store(Some(Arc::new(m)));
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(kind = ?e.kind(), "rate_limit_store: not connected yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(store)
    }

    /// Whether a connection has been made (the manager keeps it since).
    pub fn is_connected(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Charges `cost` units to bucket `name`/`key` at `per_minute` with a
    /// burst of `burst` units: `Ok(Ok(()))` admitted, `Ok(Err(wait))`
    /// refused for `wait`, `Err` when the store gave no verdict within
    /// `timeout`. `key` is a hash (never a client's raw value).
    pub async fn charge(
        &self,
        name: &str,
        key: u64,
        per_minute: u64,
        burst: u64,
        cost: u64,
    ) -> Result<Result<(), Duration>, StoreError> {
        let Some(conn) = self.conn.load_full() else {
            return Err(StoreError::Unavailable);
        };
        let mut conn = ConnectionManager::clone(&conn);
        let per_us = 60_000_000.0 / per_minute.max(1) as f64;
        let tolerance_us = per_us * burst as f64;
        // One hash tag per bucket: a cluster keeps it in one slot.
        let bucket = format!("{}:{{{name}:{key:x}}}", self.prefix);
        let mut call = self.script.key(bucket);
        call.arg(per_us).arg(tolerance_us).arg(cost);
        let reply = tokio::time::timeout(self.timeout, call.invoke_async::<(i64, i64)>(&mut conn));
        match reply.await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                Err(StoreError::Unavailable)
            }
            Ok(Err(_)) => Err(StoreError::Failed),
            Ok(Ok((1, _))) => Ok(Ok(())),
            Ok(Ok((_, wait_us))) => Ok(Err(Duration::from_micros(wait_us.max(0) as u64))),
        }
    }
}
