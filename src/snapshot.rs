//! The immutable compiled config that requests are served from.
//!
//! A `Snapshot` is built by `compile::compile`, published into the [`SnapshotStore`] and never
//! mutated afterwards. A request loads the current snapshot once and uses it until its response
//! head is out, so a swap never changes the rules under a request in flight; a body or tunnel
//! that goes on after that keeps only its route's [`RouteRecord`] and its upstream.
//!
//! Whoever lets go of a snapshot last (the reload loop after a swap, or a request that was still
//! running on it) does not free it: its routing tables go to a background thread
//! ([`Snapshot`]'s `Drop`), so freeing 100,000 routes never stalls a worker's requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use http::{HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::router::Router;
use crate::upstream::Upstream;
use crate::util::canonical_ip;
use crate::wire::StaticResponse;

/// Which config a snapshot was built from.
#[derive(Debug, Clone)]
pub struct ConfigVersion {
    /// Commit SHA for git sources, content hash (`sha256:` + 12 hex) for a plain directory.
    pub id: String,
    /// Where it came from: a directory path or a git URL.
    pub source: String,
    pub loaded_at: SystemTime,
    /// The commit, for git sources.
    pub commit: Option<crate::source::git::CommitInfo>,
    /// The branch or pinned ref that was followed, for git sources.
    pub reference: Option<String>,
}

pub struct Snapshot {
    pub version: ConfigVersion,
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub client_ip: ClientIpRules,
    /// Client connection and slow-client limits (`[limits]`).
    pub limits: Limits,
    /// `[headers] allow_underscores`: client headers with `_` in their names are passed on.
    pub allow_underscores: bool,
    /// How request paths are normalised before routing (gateway.toml `[paths]`).
    pub paths: crate::router::PathRules,
    /// `[[listener]]` of gateway.toml. Which ones are bound is fixed at start-up; TLS settings
    /// are read from the current snapshot at each handshake.
    pub listeners: Vec<ListenerSpec>,
    /// `[tracing]`: `None` when tracing is off.
    pub tracing: Option<Arc<crate::telemetry::trace::TraceConfig>>,
    /// `[rate_limit_store]`: the fleet's shared store (shared limits, fleet view, new-head
    /// fan-out); `None` without one.
    pub rate_limit_store: Option<Arc<crate::store::StoreSpec>>,
    pub warnings: usize,
    /// Counts this snapshot in [`live_snapshots`] until it is dropped.
    pub live: Live,
}

/// Counts a snapshot among the [`live_snapshots`] from its making to its drop.
#[derive(Debug)]
pub struct Live(());

static LIVE: AtomicU64 = AtomicU64::new(0);

impl Live {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Live {
        LIVE.fetch_add(1, Ordering::Relaxed);
        Live(())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Snapshots in memory: the one being served and older ones still held (by a request in
/// flight, or a compile whose result is not published yet). Above two or three for long, a
/// reference keeps old configs alive (`rustygate_config_snapshots_live`).
pub fn live_snapshots() -> u64 {
    LIVE.load(Ordering::Relaxed)
}

/// A `[[listener]]`: where it binds and how it answers.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub name: String,
    pub address: std::net::SocketAddr,
    /// HTTP/2 offered (ALPN `h2` on TLS listeners).
    pub http2: bool,
    /// Plain listener answering 308 to the HTTPS listener.
    pub redirect_to_https: bool,
    pub tls: Option<ListenerTls>,
}

impl ListenerSpec {
    /// Name, address and whether TLS is on: what a running process cannot change by reload.
    pub fn binding(&self) -> (&str, std::net::SocketAddr, bool) {
        (&self.name, self.address, self.tls.is_some())
    }
}

/// A listener's TLS termination, compiled.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// `None` when secrets were not read (`validate --no-env`); never in a served snapshot.
    pub config: Option<Arc<rustls::ServerConfig>>,
    /// The certificates, for the expiry metric and `plan`.
    pub certificates: Vec<CertificateInfo>,
    /// `client_auth` is set (required or not).
    pub client_auth: bool,
    /// The `{ file = ... }` secrets read for it (certificates, keys, CA) with the SHA-256 of
    /// what was read: a reload recompiles the same config version when one has changed, so
    /// certificates renewed in place are served without a new commit.
    pub files: Vec<(std::path::PathBuf, [u8; 32])>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        retire(Retired {
            _router: std::mem::take(&mut self.router),
            _routes: std::mem::take(&mut self.routes),
            _upstreams: std::mem::take(&mut self.upstreams),
            _listeners: std::mem::take(&mut self.listeners),
        });
    }
}

/// The large parts of a snapshot, held only to be freed.
struct Retired {
    _router: Router,
    _routes: Vec<Route>,
    _upstreams: Vec<Arc<Upstream>>,
    _listeners: Vec<ListenerSpec>,
}

/// Name of the thread that frees retired snapshots.
pub const DROPPER_THREAD: &str = "rustygate-drop";

static FREED_IN_BACKGROUND: AtomicU64 = AtomicU64::new(0);
static FREED_IN_PLACE: AtomicU64 = AtomicU64::new(0);

impl Drop for Retired {
    fn drop(&mut self) {
        // Counted before the fields are freed, on the thread that frees them.
        let counter = if std::thread::current().name() == Some(DROPPER_THREAD) {
            &FREED_IN_BACKGROUND
        } else {
            &FREED_IN_PLACE
        };
        counter.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        tests::FREED_ON_THIS_THREAD.with(|n| n.set(n.get() + 1));
    }
}

/// How many snapshots have been freed since the process started: by the background thread, and
/// in place (only when that thread could not be started).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedSnapshots {
    pub in_background: u64,
    pub in_place: u64,
}

/// Counts of freed snapshots so far (tests check that workers never free one).
pub fn freed_snapshots() -> FreedSnapshots {
    FreedSnapshots {
        in_background: FREED_IN_BACKGROUND.load(Ordering::Relaxed),
        in_place: FREED_IN_PLACE.load(Ordering::Relaxed),
    }
}

/// The dropper thread's queue, the thread started on first use; `None` if it could not start.
fn dropper() -> Option<&'static Sender<Retired>> {
    static DROPPER: OnceLock<Option<Sender<Retired>>> = OnceLock::new();
    DROPPER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Retired>();
            std::thread::Builder::new()
                .name(DROPPER_THREAD.into())
                // Ends when every sender is gone, i.e. never before the process exits.
                .spawn(move || rx.into_iter().for_each(drop))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Hands `r` to the dropper thread, or frees it here if there is none.
fn retire(r: Retired) {
    // Without the thread (or if it is gone: `send` gives `r` back), `r` is freed here.
    if let Some(tx) = dropper() {
        let _ = tx.send(r);
    }
}

impl Snapshot {
    /// Whether a secret file a TLS listener was built from now reads differently (renewed,
    /// removed). Reads at most a few small files; call off the serving threads.
    pub fn tls_files_changed(&self) -> bool {
        use sha2::Digest;
        self.listeners
            .iter()
            .flat_map(|l| l.tls.iter().flat_map(|t| &t.files))
            .any(|(path, digest)| {
                let now = std::fs::metadata(path)
                    .ok()
                    .filter(|m| m.is_file() && m.len() <= 64 * 1024)
                    .and_then(|_| std::fs::read_to_string(path).ok());
                match now {
                    Some(text) => {
                        let text = text.trim_end_matches(['\r', '\n']);
                        sha2::Sha256::digest(text.as_bytes()).as_slice() != digest.as_slice()
                    }
                    None => true,
                }
            })
    }
}

/// What the gateway reports about one served certificate.
#[derive(Debug, Clone)]
pub struct CertificateInfo {
    /// `<listener>/<index>`: the metric's `name` label.
    pub name: String,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
    pub dns_names: Vec<String>,
}

/// `[limits]` of gateway.toml: what one client may hold, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time to send each request head.
    pub header_timeout: Duration,
    /// Longest pause between request body bytes.
    pub body_idle_timeout: Duration,
    /// Longest time a client's connection may take none of what the gateway writes to it.
    pub send_timeout: Duration,
    /// Client connections, all workers together.
    pub max_connections: usize,
    /// Client connections per client address.
    pub max_connections_per_ip: Option<u32>,
    /// Request bodies buffered for retries, per worker, in bytes.
    pub max_buffered_bodies: u64,
    /// Open streams per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// Decoded request header list per HTTP/2 stream, in bytes.
    pub http2_max_header_list_size: u32,
    /// Streams abandoned per second on one HTTP/2 connection before GOAWAY.
    pub http2_max_resets_per_second: u32,
    /// Streams per HTTP/2 connection streaming a body that is still arriving to an HTTP/1.1
    /// upstream.
    pub http2_max_streaming_uploads: u32,
    /// Flow-control window of each HTTP/2 client stream, in bytes.
    pub http2_stream_window: u32,
    /// Flow-control window of each HTTP/2 client connection, in bytes: the most request data
    /// it can make the gateway hold unread.
    pub http2_connection_window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            // Each open connection costs a few KiB of buffers; 25,000 stays far below the
            // memory of a small node even when every one of them is mid-request.
            max_connections: 25_000,
            max_connections_per_ip: None,
            max_buffered_bodies: 64 * 1024 * 1024,
            http2_max_concurrent_streams: 128,
            http2_max_header_list_size: 32 * 1024,
            http2_max_resets_per_second: 100,
            // Over HTTP/1.1 a client connection holds at most one upstream connection with a
            // body still arriving; 16 lets an HTTP/2 client stream uploads in parallel without
            // holding 128.
            http2_max_streaming_uploads: 16,
            // 1 MiB a round trip (about 20 MB/s for one upload at 50 ms; Go's HTTP/2 server's
            // per-stream buffer); 64 KiB capped one upload at 1.3 MB/s there.
            http2_stream_window: 1024 * 1024,
            // 16 streams' whole windows, twice the 8 MiB 128 streams of 64 KiB had.
            http2_connection_window: 16 * 1024 * 1024,
        }
    }
}

pub struct Route {
    pub name: String,
    /// What the end of a request on this route records: held by a long exchange (a streamed
    /// body, a WebSocket tunnel) instead of the whole snapshot, which a reload can then free.
    pub record: Arc<RouteRecord>,
    pub action: RouteAction,
    /// Response-header timeout per attempt.
    pub timeout: Duration,
    /// Overrides the upstream's connect timeout.
    pub connect_timeout: Option<Duration>,
    /// Overrides the upstream's deadline for all attempts.
    pub total_timeout: Option<Duration>,
    /// Longest pause between two pieces of the upstream's response body.
    pub read_timeout: Duration,
    /// Overrides the upstream's retry settings.
    pub retry: Option<crate::upstream::RetryOverride>,
    pub max_body_size: u64,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub upstream_host: UpstreamHost,
    /// Upstream URLs in `Location`, `Content-Location` and `Refresh` are rewritten to the
    /// client's origin (see `proxy::location`).
    pub rewrite_location: bool,
    /// The route's Rhai policy: `on_request` after the filters, `on_response` before the client.
    pub policy: Option<crate::policy::RoutePolicy>,
    /// CORS: preflights answered by the gateway, headers added for allowed origins.
    pub cors: Option<Arc<crate::filters::cors::CorsPolicy>>,
    /// The rate limit; its buckets live outside the snapshot (see `filters::rate_limit`).
    pub rate_limit: Option<crate::filters::rate_limit::LimitSpec>,
    /// Authentication; verified claims reach policies and, if configured, upstream headers.
    pub auth: Option<RouteAuth>,
    /// Only requests with a verified client certificate are served (403 otherwise).
    pub require_client_cert: bool,
    /// Whether `Upgrade: websocket` requests are tunnelled (see `proxy::websocket`).
    pub websocket: bool,
    /// A tunnel with no bytes either way for this long is closed.
    pub websocket_idle_timeout: Duration,
    /// WASM plugins, in request order: after the filters and the policy's `on_request`
    /// (see [`crate::plugins`]). Empty for most routes.
    pub plugins: crate::plugins::RoutePlugins,
    /// Sampling and span settings (`tracing` key; `http.route`).
    pub tracing: crate::telemetry::trace::RouteTrace,
    /// Where the route is written and what it matches, for the admin API (`/api/v1/routes`).
    pub source: RouteSource,
}

/// A route's name, tracing settings and config version, for the access log, metrics and the
/// trace of a request that outlives its snapshot: a few hundred bytes per route, where the
/// snapshot is about 1 KB per route with its router and upstreams.
#[derive(Debug)]
pub struct RouteRecord {
    pub name: String,
    pub tracing: crate::telemetry::trace::RouteTrace,
    /// The [`ConfigVersion`] id of the snapshot the route is part of.
    pub version: Arc<str>,
}

/// A route's place in the config repo and its match, as written: the router folds host, path
/// and methods into its tables, where they cannot be listed back route by route.
#[derive(Debug, Clone, Default)]
pub struct RouteSource {
    /// Repo-relative file (shared by the routes of one file).
    pub file: Arc<str>,
    /// 1-based line and column of the route's `name`.
    pub line: u32,
    pub column: u32,
    /// Lower-case exact host or `*.suffix`; `None`: any host.
    pub host: Option<Box<str>>,
    /// The `path` pattern, or the `prefix` when [`RouteSource::prefix`] is set.
    pub path: Box<str>,
    pub prefix: bool,
    /// `None`: every method.
    pub methods: Option<Box<[&'static str]>>,
}

/// A route's authentication.
pub struct RouteAuth {
    pub provider: Arc<crate::filters::jwt::JwtProvider>,
    /// Requests without a token pass (a token that is present must be valid).
    pub optional: bool,
}

pub enum RouteAction {
    Proxy {
        upstream: Arc<Upstream>,
        rewrite: PathRewrite,
    },
    Respond(StaticResponse),
}

/// What `Host` header the upstream sees.
#[derive(Debug, Clone)]
pub enum UpstreamHost {
    /// The client's `Host` (default).
    Preserve,
    /// The target's `host:port`.
    Target,
    Fixed(HeaderValue),
}

/// How the matched path becomes the upstream path.
#[derive(Debug, Clone, Default)]
pub struct PathRewrite {
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
    pub template: Option<Vec<TemplatePart>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Param(String),
}

impl PathRewrite {
    pub fn is_identity(&self) -> bool {
        self.strip_prefix.is_none() && self.add_prefix.is_none() && self.template.is_none()
    }

    /// The upstream path for a normalised request path and its route params.
    pub fn apply(&self, path: &str, params: Option<&matchit::Params<'_, '_>>) -> String {
        if let Some(parts) = &self.template {
            let mut out = String::new();
            for part in parts {
                match part {
                    TemplatePart::Literal(s) => out.push_str(s),
                    TemplatePart::Param(name) => {
                        out.push_str(params.and_then(|p| p.get(name)).unwrap_or(""))
                    }
                }
            }
            return out;
        }
        let mut rest = path;
        if let Some(r) = self
            .strip_prefix
            .as_deref()
            .and_then(|prefix| strip_segment_prefix(path, prefix))
        {
            rest = r;
        }
        let rest = if rest.is_empty() { "/" } else { rest };
        match &self.add_prefix {
            Some(prefix) if rest == "/" => prefix.clone(),
            Some(prefix) => format!("{prefix}{rest}"),
            None => rest.to_owned(),
        }
    }
}

/// `path` without `prefix`, if `prefix` ends at a segment boundary of `path`.
pub fn strip_segment_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Headers to set and remove, validated at compile time.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut impl crate::wire::headers::HeaderSink) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Which peers' forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct ClientIpRules {
    pub trusted_proxies: Vec<IpNet>,
}

impl ClientIpRules {
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// The current snapshot, swapped atomically. Readers never block, writers never wait for readers.
pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    /// Bumped on every publish, for background tasks that follow the config (health checks).
    changes: tokio::sync::watch::Sender<u64>,
}

impl SnapshotStore {
    pub fn new(initial: Snapshot) -> Self {
        // Started now, so that the first request to let go of a snapshot never starts it.
        let _ = dropper();
        Self {
            current: ArcSwap::from_pointee(initial),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Wakes up after each publish.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The snapshot to serve one request with.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Publishes a new snapshot; requests already running keep the one they loaded.
    pub fn publish(&self, next: Snapshot) -> Arc<Snapshot> {
        let previous = self.current.swap(Arc::new(next));
        self.changes.send_modify(|n| *n += 1);
        previous
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Snapshots whose tables this thread freed.
        pub(super) static FREED_ON_THIS_THREAD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// An empty snapshot of version `id`.
    pub(crate) fn snapshot(id: &str) -> Snapshot {
        Snapshot {
            version: ConfigVersion {
                id: id.into(),
                source: String::new(),
                loaded_at: SystemTime::now(),
                commit: None,
                reference: None,
            },
            router: Router::default(),
            routes: Vec::new(),
            upstreams: Vec::new(),
            client_ip: ClientIpRules::default(),
            limits: Limits::default(),
            allow_underscores: false,
            paths: Default::default(),
            listeners: Vec::new(),
            tracing: None,
            rate_limit_store: None,
            warnings: 0,
            live: Live::new(),
        }
    }

    #[test]
    fn a_request_that_lets_go_of_a_swapped_out_snapshot_last_does_not_free_it() {
        let store = SnapshotStore::new(snapshot("old"));
        let in_flight = store.load();
        drop(store.publish(snapshot("new")));
        let before = freed_snapshots().in_background;
        // The request ends on a worker thread, holding the last reference to "old".
        let freed_by_worker = std::thread::Builder::new()
            .name("actix-server worker 0".into())
            .spawn(move || {
                assert_eq!(in_flight.version.id, "old");
                drop(in_flight);
                FREED_ON_THIS_THREAD.with(|n| n.get())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(freed_by_worker, 0, "the worker freed the snapshot itself");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while freed_snapshots().in_background == before && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            freed_snapshots().in_background > before,
            "not freed in the background"
        );
        assert_eq!(freed_snapshots().in_place, 0);
    }
}
