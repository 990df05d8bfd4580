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
    /// Names clients send in the body's `model`, each mapped to deployments
    /// and a fallback chain (routes with `model_routing`).
    #[serde(default)]
    pub models: BTreeMap<String, RawModel>,
    /// Absent: every limit is per process.
    #[serde(default)]
    pub rate_limit_store: Option<RawStore>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

/// `[telemetry]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    pub otlp: RawOtlp,
}

/// `[telemetry.otlp]`: traces over OTLP/HTTP (protobuf).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawOtlp {
    /// The collector, `http(s)://host:4318`; `/v1/traces` is added unless
    /// the path already ends in it. Empty: no traces, no exporter.
    pub endpoint: String,
    /// The resource's `service.name`.
    pub service_name: String,
    /// Share of new traces recorded (0 to 1); a client's sampled flag is
    /// followed when it sends a `traceparent`.
    pub sample_ratio: f64,
    /// Sent with every export (an `authorization` for the collector, say).
    pub headers: BTreeMap<String, String>,
    /// The upstream request carries the attempt span's `traceparent`.
    pub propagate_upstream: bool,
    /// Per export request (not in SPEC).
    pub timeout: Dur,
    /// PEM roots for an `https://` collector instead of the system's (not in SPEC).
    pub ca_file: String,
}

impl Default for RawOtlp {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            service_name: "sluice".into(),
            sample_ratio: 1.0,
            headers: BTreeMap::new(),
            propagate_upstream: true,
            timeout: Dur(Duration::from_secs(10)),
            ca_file: String::new(),
        }
    }
}

/// `[rate_limit_store]`: where `shared = true` limits keep their buckets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// `redis://host:port/db`.
    pub url: String,
    pub password_env: String,
    pub password_file: String,
    pub key_prefix: String,
    /// Per call; past it, `on_error` applies.
    pub timeout: Dur,
    pub on_error: OnStoreError,
    /// With `local-share`, each process admits limit / replicas.
    pub replicas: u32,
    /// A Redis Cluster: `url` and `nodes` are seeds (not in SPEC).
    pub cluster: bool,
    pub nodes: Vec<String>,
    /// PEM roots for `rediss://` instead of the system's (not in SPEC).
    pub ca_file: String,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: String::new(),
            password_env: String::new(),
            password_file: String::new(),
            key_prefix: "sluice".into(),
            timeout: Dur(Duration::from_millis(25)),
            on_error: OnStoreError::LocalShare,
            replicas: 1,
            cluster: false,
            nodes: Vec::new(),
            ca_file: String::new(),
        }
    }
}

/// `on_error = ...`: what a shared limit does without its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnStoreError {
    /// Admit against a local bucket of limit / replicas.
    LocalShare,
    Allow,
    /// 503 `rate_limit_store_unavailable`.
    Deny,
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
    /// Request body bytes held across all requests for peeking and replay;
    /// a request that would pass it is answered 503.
    pub max_held_body: Size,
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
            max_held_body: Size(512 << 20),
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
    /// Fills defaults (url, auth, headers, dialect) for a known provider;
    /// every key set here overrides them.
    #[serde(default)]
    pub preset: Preset,
    /// `scheme://host[:port][/base-path]`; the preset's when absent.
    #[serde(default)]
    pub url: Option<String>,
    /// Environment variable holding the provider key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the provider key (trailing whitespace is trimmed).
    #[serde(default)]
    pub api_key_file: Option<String>,
    /// How the key is sent; the preset's when absent (else bearer).
    #[serde(default)]
    pub auth: Option<AuthScheme>,
    /// Extra headers set on every upstream request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Bound on TCP connect plus TLS handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Dur,
    /// Extra PEM roots trusted for this upstream; "" for none.
    #[serde(default)]
    pub ca_file: String,
    /// Whether sluice may add `stream_options.include_usage`; the preset's
    /// when absent (custom: false).
    #[serde(default)]
    pub inject_usage: Option<bool>,
    /// Azure's URL form: "v1" (/openai/v1/...) or "deployments"
    /// (/openai/deployments/{model}/...?api-version=).
    #[serde(default)]
    pub azure_api: Option<AzureApi>,
    /// `api-version` for `azure_api = "deployments"`.
    #[serde(default)]
    pub api_version: String,
    /// Passive health of this upstream's deployments.
    #[serde(default)]
    pub health: RawHealth,
}

/// `preset = ...`: a known provider's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Nothing filled in: `url` is required.
    #[default]
    Custom,
    Openai,
    Azure,
    Anthropic,
    Gemini,
    Vllm,
    Ollama,
}

/// `azure_api = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AzureApi {
    V1,
    Deployments,
}

/// `[upstreams.NAME.health]`: when a deployment is taken out of rotation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHealth {
    /// Ejected after this many failures in a row ...
    pub consecutive_failures: u32,
    /// ... or failures/attempts over `window` above this ...
    pub failure_ratio: f64,
    /// ... with at least this many attempts in the window.
    pub min_requests: u32,
    pub window: Dur,
    /// The first ejection's length; doubles on each failed probe ...
    pub base_ejection: Dur,
    /// ... up to this.
    pub max_ejection: Dur,
    /// After 401/403/insufficient_quota for a key sluice injected.
    pub auth_ejection: Dur,
    /// `x-ratelimit-remaining-*: 0` marks it saturated until the reset.
    pub honor_rate_limit_headers: bool,
}

impl Default for RawHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            min_requests: 10,
            window: Dur(Duration::from_secs(30)),
            base_ejection: Dur(Duration::from_secs(10)),
            max_ejection: Dur(Duration::from_secs(30)),
            auth_ejection: Dur(Duration::from_secs(300)),
            honor_rate_limit_headers: true,
        }
    }
}

/// `[models.NAME]`: a name clients send, its deployments and fallbacks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub deployments: Vec<RawDeployment>,
    #[serde(default)]
    pub balance: Balance,
    /// `balance = "hash"`: the header whose value picks the deployment.
    #[serde(default)]
    pub hash_header: String,
    /// Attempts on this model before moving down `fallbacks` (default: 2
    /// with fallbacks, else the route's).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// Other `[models]` names, tried in order (their own fallbacks are not
    /// followed).
    #[serde(default)]
    pub fallbacks: Vec<String>,
    #[serde(default)]
    pub on_all_ejected: OnAllEjected,
}

/// One entry of `deployments`: an upstream and the model name it knows.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub upstream: String,
    /// The model sent upstream; absent: the `[models]` entry's name; "":
    /// the body's model as sent.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "one")]
    pub weight: u32,
    /// `balance = "priority"`: the lowest value among healthy deployments wins.
    #[serde(default)]
    pub priority: u32,
    /// Requests per minute this deployment takes; 0 = no limit.
    #[serde(default)]
    pub rpm: u32,
    /// Tokens per minute this deployment takes; 0 = no limit.
    #[serde(default)]
    pub tpm: u64,
    /// Requests in flight at once; 0 = no cap.
    #[serde(default)]
    pub max_concurrent: u32,
}

fn one() -> u32 {
    1
}

/// `balance = ...`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// P2C on in-flight requests per weight.
    #[default]
    LeastRequest,
    /// Random by weight.
    Weighted,
    /// The lowest `priority` among eligible deployments, ties by weight.
    Priority,
    /// Rendezvous hash of `hash_header` (prompt-cache affinity).
    Hash,
}

/// `on_all_ejected = ...`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAllEjected {
    /// Try the deployment that recovers soonest.
    #[default]
    Probe,
    /// Move down the fallback chain.
    Fallback,
    /// Answer 503 `no_healthy_deployment`.
    Fail,
}

/// `unknown_model = ...`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModel {
    /// 404 `model_not_found`.
    #[default]
    Reject,
    /// To the route's `upstream`, body untouched.
    Passthrough,
}

/// `commit = ...`: when a response is the client's for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Commit {
    /// When the response headers arrive.
    #[default]
    Headers,
    /// A 2xx SSE response: at its first complete non-comment event.
    FirstEvent,
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
    /// Name of an `[upstreams.NAME]` table. With `model_routing`: where
    /// passthrough and non-JSON requests go (optional).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Read the JSON body's top-level `model` and route by `[models]`.
    #[serde(default)]
    pub model_routing: bool,
    /// `[models]` names this route allows; empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub unknown_model: UnknownModel,
    /// Most body bytes held while looking for fields.
    #[serde(default = "default_peek_limit")]
    pub peek_limit: Size,
    /// With `model_routing`: answer `GET {prefix}/models` from `[models]`.
    #[serde(default = "yes")]
    pub list_models: bool,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub retry: RawRetry,
    /// Absent: unlimited.
    #[serde(default)]
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub usage: RawUsage,
    /// Absent: no token limit.
    #[serde(default)]
    pub token_limit: Option<RawTokenLimit>,
    #[serde(default)]
    pub sse: RawSse,
}

/// `[routes.usage]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUsage {
    /// When to add `stream_options.include_usage` to a streamed chat.
    pub inject: Inject,
    /// Read token usage from responses (metrics, access line, settling).
    pub observe: bool,
}

impl Default for RawUsage {
    fn default() -> Self {
        Self {
            inject: Inject::WhenLimited,
            observe: true,
        }
    }
}

/// `inject = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Inject {
    /// On routes with a `[routes.token_limit]`.
    WhenLimited,
    Always,
    Never,
}

/// `[routes.token_limit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTokenLimit {
    /// Required (> 0).
    pub tokens_per_minute: u64,
    /// Tokens at once from a full bucket; 0 = ten seconds' worth.
    pub burst: u64,
    pub per: RateLimitPer,
    pub client_key_header: String,
    /// Which tokens are charged.
    pub count: TokenCount,
    /// Input estimate: non-image body bytes / this.
    pub chars_per_token: f64,
    /// Per `data:` URI in the body.
    pub image_tokens: u64,
    /// Output estimate when the body sets no maximum.
    pub default_output_tokens: u64,
    pub max_wait: Dur,
    /// Keep the bucket in `[rate_limit_store]`.
    pub shared: bool,
}

impl Default for RawTokenLimit {
    fn default() -> Self {
        Self {
            tokens_per_minute: 0,
            burst: 0,
            per: RateLimitPer::Route,
            client_key_header: "authorization".into(),
            count: TokenCount::Total,
            chars_per_token: 4.0,
            image_tokens: 1000,
            default_output_tokens: 1024,
            max_wait: Dur(Duration::ZERO),
            shared: false,
        }
    }
}

/// `count = ...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenCount {
    Total,
    Input,
    Output,
}

/// `[routes.sse]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSse {
    /// Silence towards the client after which a comment line goes out; 0 = off.
    pub keepalive: Dur,
}

impl Default for RawSse {
    fn default() -> Self {
        Self {
            keepalive: Dur(Duration::ZERO),
        }
    }
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
    /// Keep the bucket in `[rate_limit_store]` (the in-flight cap stays local).
    pub shared: bool,
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
            shared: false,
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
    /// Outcomes that move the request down the fallback chain.
    pub fallback_on: Vec<RetryOn>,
    pub commit: Commit,
    /// `commit = "first-event"`: commit anyway once this much is held.
    pub commit_buffer: Size,
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
            fallback_on: vec![
                Word("connect-failure".into()),
                Word("reset".into()),
                Word("timeout".into()),
                Word("stream-error".into()),
                Word("insufficient-quota".into()),
                Word("upstream-auth".into()),
                Status(429),
                Status(500),
                Status(502),
                Status(503),
                Status(504),
                Status(529),
            ],
            commit: Commit::Headers,
            commit_buffer: Size(64 << 10),
        }
    }
}

/// One `retry_on` entry: a condition word or a status code.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = r#"a status code or one of the outcome words ("connect-failure", "reset", "timeout", ...)"#
)]
pub enum RetryOn {
    Status(i64),
    Word(String),
}

fn default_peek_limit() -> Size {
    Size(32 << 20)
}

fn yes() -> bool {
    true
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
