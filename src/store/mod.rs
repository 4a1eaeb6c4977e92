//! The store a fleet of replicas shares: one Redis (or Valkey) named by gateway.toml's
//! `[rate_limit_store]`. It holds what replicas must agree on and nothing else:
//!
//! * the buckets of rate limits with `store = "redis"` ([`gcra`], one Lua script per check);
//! * the fleet view, which commit each replica serves, and the "new head seen" channel that
//!   makes every replica fetch when one of them got a webhook ([`fleet`]).
//!
//! Health state, circuit breakers, connection pools and local limits stay per replica
//! (docs/scale-out.md). A store is opened lazily by a running gateway, never by `validate`, and
//! one that is down never stops a gateway from starting: its limits apply `on_store_error`.

pub mod fleet;
pub mod gcra;
pub mod link;
pub mod socket;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use redis::aio::MultiplexedConnection;
use redis::io::tcp::{TcpSettings, socket2::TcpKeepalive};
use redis::{ConnectionInfo, IntoConnectionInfo, RedisResult};

use crate::telemetry::throttle::LogThrottle;
use link::Link;

/// Time one rate-limit check may wait for the store (`timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(25);
/// Prefix of every key and channel the gateway uses (`key_prefix`).
pub const DEFAULT_KEY_PREFIX: &str = "rustygate:";
/// After a failed or timed-out call, checks skip the store for this long: a store that is down
/// or stalled costs requests neither a round-trip nor a timeout each.
pub const PAUSE_AFTER_ERROR: Duration = Duration::from_millis(250);
/// Store errors are logged at most once per this interval, with how many there were meanwhile.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Time a connection to the store gets to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A store connection idle this long is probed by TCP keepalive; with [`TCP_USER_TIMEOUT`],
/// a peer that vanished from the network (no RST) is given up within seconds, also on the
/// heads subscription, which waits without a timeout of its own between its pings.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// Data sent to the store and not acknowledged for this long closes the connection (Linux
/// `TCP_USER_TIMEOUT`).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a limit does when the store cannot answer within its `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnStoreError {
    /// The request passes (availability over the limit).
    Allow,
    /// The request is answered 429 (the limit over availability).
    Deny,
    /// This replica's own in-process limit at `requests ÷ expected_replicas` decides.
    Local,
}

impl OnStoreError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
            OnStoreError::Local => "local",
        }
    }
}

/// `[rate_limit_store]`, compiled: where the store is and how limits use it. Equal specs share
/// one connection; a changed spec (a rotated password) opens a new one.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreSpec {
    /// One of [`STORE_SCHEMES`]. One written in the repo holds no password; one read from a
    /// secret may: show it with [`StoreSpec::shown_url`].
    pub url: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Time one check may wait for the store.
    pub timeout: Duration,
    pub on_error: OnStoreError,
    /// Replicas sharing the store: the local fallback allows `requests ÷ expected_replicas`.
    pub expected_replicas: u32,
    pub key_prefix: String,
}

/// The URL schemes a store may have: TCP (`redis`, `valkey`), TLS (`rediss`, `valkeys`) and a
/// Unix socket beside the gateway (`redis+unix:///run/redis.sock`, `valkey+unix`, `unix`).
pub const STORE_SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "redis+unix",
    "valkey+unix",
    "unix",
];

/// Whether a store URL of this scheme names a Unix socket (its password, if any, is the `pass`
/// query parameter).
pub fn is_unix_scheme(scheme: &str) -> bool {
    matches!(scheme, "redis+unix" | "valkey+unix" | "unix")
}

/// A store URL as logs, diagnostics and the admin API may show it: without `user:password@`,
/// and without the `pass` query parameter a Unix-socket URL carries its password in.
pub fn redact_store_url(url: &str) -> String {
    let shown = crate::source::redact_url(url);
    let Some((base, query)) = shown.split_once('?') else {
        return shown;
    };
    let (query, fragment) = query
        .split_once('#')
        .map_or((query, None), |(q, f)| (q, Some(f)));
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split('=').next() != Some("pass"))
        .collect();
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

// The password never reaches a log line.
impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSpec")
            .field("url", &self.shown_url())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("on_error", &self.on_error)
            .field("expected_replicas", &self.expected_replicas)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl StoreSpec {
    /// The URL without its password, for logs and the admin API ([`redact_store_url`]).
    pub fn shown_url(&self) -> String {
        redact_store_url(&self.url)
    }

    /// How redis-rs connects: the URL with the credentials from their secret references, and
    /// the socket options of [`tcp_settings`]. Parsing only; nothing is connected.
    pub fn connection_info(&self) -> RedisResult<ConnectionInfo> {
        let info = self.url.as_str().into_connection_info()?;
        let mut redis = info.redis_settings().clone();
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p);
        }
        Ok(info
            .set_redis_settings(redis)
            .set_tcp_settings(tcp_settings()))
    }

    /// A key or channel name under this store's prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.key_prefix)
    }
}

/// Socket options of every store connection: no Nagle delay on the small commands, keepalive
/// probes and `TCP_USER_TIMEOUT`, so that a peer gone from the network fails the connection
/// instead of leaving it open forever.
pub fn tcp_settings() -> TcpSettings {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_IDLE);
    let settings = TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(TCP_USER_TIMEOUT);
    settings
}

/// `rustygate_rate_limit_store_errors_total{route,reason}` and
/// `rustygate_rate_limit_store_seconds`: kept by the limiter registry, registered with the
/// gateway's metrics by the admin listener.
#[derive(Clone)]
pub struct StoreMetrics {
    pub errors: IntCounterVec,
    pub latency: Histogram,
}

/// Per-check latency buckets: a loopback round-trip is tens of microseconds, the default
/// timeout 25 ms.
const CHECK_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

impl Default for StoreMetrics {
    fn default() -> Self {
        let errors = IntCounterVec::new(
            Opts::new(
                "rustygate_rate_limit_store_errors_total",
                "Rate-limit checks the shared store did not answer (reason: timeout, error, or unavailable while paused after one); on_store_error decided them.",
            ),
            &["route", "reason"],
        );
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "rustygate_rate_limit_store_seconds",
                "Time of rate-limit checks answered by the shared store (one script call).",
            )
            .buckets(CHECK_BUCKETS.to_vec()),
        );
        match (errors, latency) {
            (Ok(errors), Ok(latency)) => StoreMetrics { errors, latency },
            _ => invalid_metric(),
        }
    }
}

/// Why a call to the store gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("paused after an error")]
    Paused,
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected answer: {0}")]
    Answer(String),
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl StoreError {
    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Paused => "unavailable",
            StoreError::Redis(_) | StoreError::Answer(_) | StoreError::Connect(_) => "error",
        }
    }
}

/// A live store: one multiplexed connection ([`Link`]), shared by every limit of the process
/// that uses this spec, and replaced when a call times out or fails on it.
pub struct Store {
    pub spec: Arc<StoreSpec>,
    /// `None` when the URL cannot be opened at all. Connections are made on first use, inside
    /// the runtime that first uses them (their reading task runs there).
    link: Option<Link>,
    started: Instant,
    /// Milliseconds since `started` before which calls are skipped.
    paused_until: AtomicU64,
    /// Error lines: one per [`LOG_EVERY`].
    log: LogThrottle,
    pub metrics: StoreMetrics,
}

impl Store {
    pub fn new(spec: Arc<StoreSpec>, metrics: StoreMetrics) -> Store {
        let link = match spec.connection_info() {
            Ok(info) => Some(Link::new(info)),
            Err(e) => {
                // compile checked the URL; a store that cannot be opened answers every call
                // with an error, and the limits apply `on_store_error`.
                tracing::error!(url = %spec.shown_url(), error = %e, "rate-limit store cannot be opened");
                None
            }
        };
        Store {
            spec,
            link,
            started: Instant::now(),
            paused_until: AtomicU64::new(0),
            log: LogThrottle::new(LOG_EVERY),
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs `call` on the store within the spec's timeout (connecting included), unless the
    /// store is paused after an error. A failure pauses the store for [`PAUSE_AFTER_ERROR`] and
    /// is logged (throttled); one that says the connection is stalled or broken (a timeout, an
    /// I/O error) also replaces the connection, at once: Redis answers in order, so every later
    /// call on it would queue behind the reply that did not come.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        if self.now_ms() < self.paused_until.load(Ordering::Relaxed) {
            return Err(StoreError::Paused);
        }
        let Some(link) = &self.link else {
            return Err(StoreError::Answer("the store cannot be opened".into()));
        };
        let timeout = self.spec.timeout;
        let mut used = None;
        let attempt = async {
            let (generation, conn) = link.get().await?;
            used = Some(generation);
            call(conn).await
        };
        let r = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(timeout)),
        };
        if let Err(e) = &r {
            if let Some(generation) = used.filter(|_| link::connection_failed(e)) {
                link.replace(generation);
            }
            self.paused_until.store(
                self.now_ms() + PAUSE_AFTER_ERROR.as_millis() as u64,
                Ordering::Relaxed,
            );
            self.log_error(e);
        }
        r
    }

    /// One warning per [`LOG_EVERY`] at most, counting the errors in between.
    pub fn log_error(&self, e: &StoreError) {
        if let Some(more) = self.log.due() {
            tracing::warn!(
                url = %self.spec.shown_url(),
                error = %e,
                errors_since_last_log = more,
                on_store_error = self.spec.on_error.as_str(),
                "the shared store did not answer; rate-limit checks apply on_store_error (logged at most every {}s)",
                LOG_EVERY.as_secs()
            );
        }
    }

    /// Connects and loads the script ahead of the first request (best effort, in the
    /// background of the current runtime).
    pub fn warm_up(self: &Arc<Self>) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if self.link.is_none() {
            return;
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT * 2, async {
                let (_, mut conn) = store.link.as_ref()?.get().await.ok()?;
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(gcra::SCRIPT)
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            })
            .await;
        });
    }
}

/// The metric definitions above are constants; prometheus only rejects invalid names.
#[cold]
fn invalid_metric<T>() -> T {
    panic!("invalid built-in metric definition")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> StoreSpec {
        StoreSpec {
            url: url.into(),
            username: Some("gw".into()),
            password: Some("s3cret".into()),
            timeout: DEFAULT_TIMEOUT,
            on_error: OnStoreError::Local,
            expected_replicas: 3,
            key_prefix: DEFAULT_KEY_PREFIX.into(),
        }
    }

    #[test]
    fn credentials_come_from_their_references_and_never_reach_debug_output() {
        let info = spec("rediss://redis.internal:6380/2")
            .connection_info()
            .unwrap();
        assert_eq!(info.redis_settings().username(), Some("gw"));
        assert_eq!(info.redis_settings().password(), Some("s3cret"));
        assert_eq!(info.redis_settings().db(), 2);
        assert!(matches!(
            info.addr(),
            redis::ConnectionAddr::TcpTls { host, port: 6380, .. } if host == "redis.internal"
        ));
        let debug = format!("{:?}", spec("redis://127.0.0.1/"));
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    /// A URL read from a secret (`url = { env = "REDIS_URL" }`) may carry the password: it
    /// still connects with it, and neither the logs, the fleet API nor `Debug` show it.
    #[test]
    fn a_password_inside_a_secret_url_is_used_and_never_shown() {
        let mut s = spec("redis://default:hunter2pw@127.0.0.1:6379/1");
        s.password = None;
        s.username = None;
        let info = s.connection_info().unwrap();
        assert_eq!(info.redis_settings().password(), Some("hunter2pw"));
        assert_eq!(s.shown_url(), "redis://127.0.0.1:6379/1");
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2pw"), "{debug}");
    }

    /// A Unix-socket URL read from a secret carries its password as `?pass=`: used to connect,
    /// never shown.
    #[test]
    fn a_unix_socket_url_connects_there_and_hides_its_password() {
        let mut s = spec("redis+unix:///run/redis/redis.sock?db=3&pass=hunter2pw");
        s.password = None;
        s.username = None;
        let info = s.connection_info().unwrap();
        assert_eq!(info.redis_settings().password(), Some("hunter2pw"));
        assert_eq!(info.redis_settings().db(), 3);
        assert!(matches!(
            info.addr(),
            redis::ConnectionAddr::Unix(p) if p == std::path::Path::new("/run/redis/redis.sock")
        ));
        assert_eq!(s.shown_url(), "redis+unix:///run/redis/redis.sock?db=3");
        assert!(!format!("{s:?}").contains("hunter2pw"));
        assert_eq!(
            redact_store_url("unix:///s.sock?pass=x#frag"),
            "unix:///s.sock#frag"
        );
        assert_eq!(
            redact_store_url("unix:///s.sock?passive=1"),
            "unix:///s.sock?passive=1"
        );
    }
}
