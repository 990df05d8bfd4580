//! The config exactly as written in TOML: serde types and defaults, no
//! cross-field checks (those live in `resolve.rs`). Every field is documented
//! here because this is the file a reader opens to learn a key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    /// Named upstreams; routes refer to them by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    /// Checked in file order; the first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// `[server]`: the data-plane listener and its limits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    /// Data-plane address, HTTP/1.1 and h2c (or TLS with `tls`).
    pub listen: String,
    /// Admin address for /healthz /readyz /metrics; "" disables.
    pub admin_listen: String,
    /// Request bodies larger than this are answered 413.
    pub max_request_body: Size,
    /// Request bodies up to this size are held in memory for replay.
    pub retry_buffer: Size,
    /// A client must finish sending request headers within this.
    pub header_read_timeout: Dur,
    /// Drain window after SIGTERM/SIGINT.
    pub shutdown_grace: Dur,
    /// A client that takes none of its response for this long is cut off.
    pub send_timeout: Dur,
    /// Serve TLS on `listen` with this certificate chain and key.
    pub tls: Option<RawTls>,
    /// Client connections served at once; beyond, new ones are closed at
    /// once. Absent: sized from the open-file limit.
    pub max_connections: Option<u32>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9901".into(),
            max_request_body: Size(32 << 20),
            retry_buffer: Size(4 << 20),
            header_read_timeout: Dur(Duration::from_secs(10)),
            shutdown_grace: Dur(Duration::from_secs(30)),
            send_timeout: Dur(Duration::from_secs(60)),
            tls: None,
            max_connections: None,
        }
    }
}

/// `[server.tls]`: PEM files for the listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Certificate chain, leaf first.
    pub cert: String,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// A tracing filter such as "info" or "sluice=debug"; RUST_LOG overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[upstreams.NAME]`: one provider endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `scheme://host[:port][/base-path]`.
    pub url: String,
    /// Environment variable holding the provider key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the provider key (trailing whitespace is trimmed).
    #[serde(default)]
    pub api_key_file: Option<String>,
    /// How the key is sent.
    #[serde(default)]
    pub auth: AuthScheme,
    /// Extra headers set on every upstream request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Bound on TCP connect plus TLS handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Extra PEM roots trusted for this upstream; "" for none.
    #[serde(default)]
    pub ca_file: String,
}

fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

/// `auth = ...`: which header carries the upstream key (a dialect's choice).
pub use crate::provider::AuthScheme;

/// `[[routes]]`: which requests go to which upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique; used in logs and metric labels.
    pub name: String,
    /// Matches on segment boundaries: "/v1" matches /v1 and /v1/..., not /v1x.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Methods this route takes; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Remove `path_prefix` from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Name of an `[upstreams.NAME]` table.
    pub upstream: String,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub retry: RawRetry,
    /// Absent: unlimited.
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
}

/// `[routes.rate_limit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    /// GCRA rate; 0 = no rate limit (only `max_concurrent`).
    pub requests_per_minute: u32,
    /// Requests allowed at once from a full bucket.
    pub burst: u32,
    /// One bucket for the route, or one per client key.
    pub per: RateLimitPer,
    /// Header identifying a client for `per = "client"`; hashed, never logged.
    pub client_key_header: String,
    /// Wait up to this for a permit before answering 429.
    pub max_wait: Dur,
    /// Requests of this route in flight at once; 0 = no cap.
    pub max_concurrent: u32,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        Self {
            requests_per_minute: 600,
            burst: 60,
            per: RateLimitPer::Route,
            client_key_header: "authorization".into(),
            max_wait: Dur(Duration::ZERO),
            max_concurrent: 0,
        }
    }
}

/// `per = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitPer {
    Route,
    Client,
}

/// `[routes.timeouts]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    /// Per attempt: request sent to response headers.
    pub first_byte: Dur,
    /// Longest silence between response body chunks.
    pub idle: Dur,
    /// Whole exchange (attempts, backoff, streaming); "0s" = none.
    pub total: Dur,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        Self {
            first_byte: Dur(Duration::from_secs(120)),
            idle: Dur(Duration::from_secs(60)),
            total: Dur(Duration::ZERO),
        }
    }
}

/// `[routes.retry]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRetry {
    /// Total tries including the first; 1 disables retries.
    pub attempts: u32,
    /// Full jitter: sleep = rand(0, min(backoff_max, backoff_base * 2^n)).
    pub backoff_base: Dur,
    pub backoff_max: Dur,
    /// "connect-failure", "reset", "timeout", and HTTP status codes.
    pub retry_on: Vec<RetryOn>,
    /// Wait at least as long as Retry-After / retry-after-ms ask.
    pub honor_retry_after: bool,
    /// A longer hint is not waited for: that response is returned.
    pub max_retry_after: Dur,
    /// Retries may be at most this fraction of requests over `budget_ttl` ...
    pub budget_ratio: f64,
    /// ... plus this many retries per second, always allowed.
    pub budget_min_per_second: u32,
    pub budget_ttl: Dur,
}

impl Default for RawRetry {
    fn default() -> Self {
        use RetryOn::{Status, Word};
        Self {
            attempts: 3,
            backoff_base: Dur(Duration::from_millis(250)),
            backoff_max: Dur(Duration::from_secs(8)),
            retry_on: vec![
                Word("connect-failure".into()),
                Word("reset".into()),
                Status(429),
                Status(500),
                Status(502),
                Status(503),
                Status(504),
            ],
            honor_retry_after: true,
            max_retry_after: Dur(Duration::from_secs(20)),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_ttl: Dur(Duration::from_secs(10)),
        }
    }
}

/// One `retry_on` entry: a condition word or a status code.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = r#"a status code or one of "connect-failure", "reset", "timeout""#
)]
pub enum RetryOn {
    Status(i64),
    Word(String),
}

fn default_prefix() -> String {
    "/".into()
}

/// The longest duration a config may hold.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration written as a string with a unit: "250ms", "30s", "5m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration string such as "250ms", "30s" or "5m""#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                let d = humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format_args!(
                        r#"invalid duration "{s}": {e} (write e.g. "250ms", "30s", "5m")"#
                    ))
                })?;
                // Deadlines are instants plus these: keep them far from overflow.
                if d > MAX_DURATION {
                    return Err(E::custom(format_args!(
                        r#"duration "{s}" is over 365 days"#
                    )));
                }
                Ok(Dur(d))
            }
        }
        d.deserialize_str(V)
    }
}

/// A size: an integer of bytes, or a string such as "32MiB" or "512KiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size: bytes as an integer, or a string such as "32MiB""#)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                s.trim()
                    .parse::<bytesize::ByteSize>()
                    .map(|b| Size(b.as_u64()))
                    .map_err(|_| {
                        E::custom(format_args!(
                            r#"invalid size "{s}" (write e.g. "32MiB", "512KiB" or a number of bytes)"#
                        ))
                    })
            }
        }
        d.deserialize_any(V)
    }
}
