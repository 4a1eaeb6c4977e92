//! The Actix-web servers: the proxy listener, the admin listener, and their shutdown.
//!
//! Each proxy worker gets its own upstream client (pools stay on the worker's thread) and reads
//! the shared [`SnapshotStore`] once per request. Signals are handled here, not by actix, so that
//! both listeners stop together and in-flight requests get the grace period.

mod admin;
mod admin_limits;
mod api;
mod bind;
pub(crate) mod drain;
mod edge;
mod expect;
mod h2;
mod handler;
mod listener;
mod tls;
mod ui;
pub mod webhooks;

/// Whether this build serves HTTP/2 on TLS listeners (ALPN `h2`, through [`h2::serve`]).
pub const SERVES_H2: bool = true;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::rc::Rc;

use actix_service::{Service, ServiceFactory, fn_factory, fn_service};
use actix_web::{App, HttpServer, web};

use crate::proxy::pool::LocalPool;
use crate::snapshot::SnapshotStore;
use crate::source::reload::{ReloadStatus, Trigger};
use crate::telemetry::metrics::Metrics;

/// What the admin listener needs besides the snapshot: reload state and triggers, secrets.
#[derive(Clone, Default)]
pub struct Control {
    pub status: Arc<Mutex<ReloadStatus>>,
    pub metrics: Arc<Metrics>,
    /// Where reload triggers go; `None` when the source cannot be reloaded.
    pub reload: Option<tokio::sync::mpsc::Sender<Trigger>>,
    /// Set by a forced reload request before it is queued, read by the reloader: a force that
    /// meets a full queue is answered by the reload already pending, still forced.
    pub force_pending: Arc<std::sync::atomic::AtomicBool>,
    /// `RUSTYGATE_ADMIN_TOKEN`: without it `POST /admin/reload` is disabled.
    pub admin_token: Option<String>,
    /// `RUSTYGATE_WEBHOOK_SECRET`: without it the webhook endpoints are disabled.
    pub webhook_secret: Option<String>,
    /// Pushes to other branches are ignored; `None` (pinned ref) reacts to every push.
    pub branch: Option<String>,
    /// Rate-limit buckets, kept across snapshots.
    pub limiters: Arc<crate::filters::rate_limit::Limiters>,
    /// The fleet view and head fan-out (used when the snapshot has `[rate_limit_store]`).
    pub fleet: Option<Arc<crate::store::fleet::Fleet>>,
}

/// How this gateway process runs (flags and `RUSTYGATE_*` variables, never the config repo).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub workers: usize,
    /// Time in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Emit one access-log event per request.
    pub access_log: bool,
    /// Idle keep-alive time for client connections.
    pub keep_alive: Duration,
    /// Time a client has to send its first request head, before the config's own
    /// `[limits] header_timeout` takes over (slowloris guard).
    pub client_request_timeout: Duration,
    /// How often the dashboard's traffic ring is sampled (tests shorten it).
    pub traffic_sample_every: Duration,
    /// Time one request on the admin listener may take, its body included (tests shorten it).
    pub admin_request_timeout: Duration,
    /// PINGs on upstream HTTP/2 connections (tests shorten them).
    pub upstream_h2_ping: crate::proxy::pool::H2Ping,
    /// Largest webhook body read (`--webhook-max-body`); at most four such are read at once.
    pub webhook_max_body: usize,
    /// Connections one client address (an IPv6 client by its /64) may hold on the admin
    /// listener at once; more are closed at once.
    pub admin_connections_per_client: usize,
}

/// Connections the admin listener holds open at once; more wait in the kernel's backlog. The
/// admin listener takes webhooks from the internet, so a flood of slow connections there must
/// not use up the process's file descriptors (and starve the proxy listener with them).
const ADMIN_MAX_CONNECTIONS: usize = 256;
/// Of those, what one client address may hold: the kubelet's probes, Prometheus and an
/// operator's browser each need a few; a webhook sender (an ingress) rarely more.
const ADMIN_CONNECTIONS_PER_CLIENT: usize = 16;

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            shutdown_grace: Duration::from_secs(30),
            access_log: true,
            keep_alive: Duration::from_secs(75),
            client_request_timeout: Duration::from_secs(10),
            traffic_sample_every: crate::telemetry::traffic::SAMPLE_EVERY,
            admin_request_timeout: Duration::from_secs(10),
            upstream_h2_ping: crate::proxy::pool::H2Ping::default(),
            webhook_max_body: webhooks::MAX_WEBHOOK_BODY,
            admin_connections_per_client: ADMIN_CONNECTIONS_PER_CLIENT,
        }
    }
}

pub(crate) struct WorkerState {
    pub store: Arc<SnapshotStore>,
    pub pool: std::rc::Rc<LocalPool>,
    pub access_log: bool,
    pub recorder: crate::telemetry::recorder::Recorder,
    pub limiters: edge::WorkerLimiters,
    /// Bytes of request bodies this worker holds for retries (`[limits] max_buffered_bodies`).
    pub buffered: std::rc::Rc<std::cell::Cell<u64>>,
}

/// Both listeners, bound and running inside the current actix system.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The `[[listener]]`s, by name, with the address each is bound to.
    pub listeners: Vec<(String, SocketAddr)>,
    proxy: actix_web::dev::Server,
    admin: actix_web::dev::Server,
}

impl Running {
    /// Handles to stop both servers from elsewhere.
    pub fn handles(&self) -> Handles {
        Handles {
            proxy: self.proxy.handle(),
            admin: self.admin.handle(),
        }
    }

    /// Runs until both servers have stopped.
    pub async fn wait(self) -> std::io::Result<()> {
        let (a, b) = futures_util::future::join(self.proxy, self.admin).await;
        a.and(b)
    }
}

#[derive(Clone)]
pub struct Handles {
    proxy: actix_web::dev::ServerHandle,
    admin: actix_web::dev::ServerHandle,
}

impl Handles {
    /// Stops accepting, lets in-flight requests finish (up to the grace period), then returns.
    pub async fn stop(&self, graceful: bool) {
        futures_util::future::join(self.proxy.stop(graceful), self.admin.stop(graceful)).await;
    }
}

/// How one bound proxy listener treats its connections.
#[derive(Clone)]
enum Kind {
    Plain { redirect_to: Option<u16> },
    Tls(Arc<tls::TlsListener>),
}

/// Binds the listeners (`--listen`, the first snapshot's `[[listener]]`s, admin) and starts
/// serving. Must run inside an actix system.
pub fn start(
    opts: &ServeOptions,
    store: Arc<SnapshotStore>,
    control: Control,
) -> std::io::Result<Running> {
    let listener = bind::listen(opts.listen, "proxy")?;
    let admin_listener = bind::listen(opts.admin_listen, "admin")?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let grace = opts.shutdown_grace.as_secs().max(1);

    // Which listeners exist is fixed here; a reload that changes the set is logged
    // (`warn_listener_changes`) and needs a restart.
    let first = store.load();
    let mut extra = Vec::new();
    for spec in &first.listeners {
        let l = bind::listen(spec.address, &format!("listener `{}`", spec.name))?;
        let bound = l.local_addr()?;
        extra.push((spec, l, bound));
    }
    let https_port = extra
        .iter()
        .find(|(spec, _, _)| spec.tls.is_some())
        .map(|(_, _, a)| a.port());
    let mut bound = Vec::new();
    let mut kinds = Vec::new();
    for (spec, l, a) in extra {
        let kind = match spec.tls.as_ref() {
            Some(t) => {
                let Some(config) = t.config.clone() else {
                    return Err(std::io::Error::other(format!(
                        "listener `{}` has no TLS settings: its secrets were not read",
                        spec.name
                    )));
                };
                Kind::Tls(Arc::new(tls::TlsListener::new(&spec.name, config)))
            }
            None => Kind::Plain {
                redirect_to: https_port.filter(|_| spec.redirect_to_https),
            },
        };
        bound.push((spec.name.clone(), a));
        // h2c (HTTP/2 without TLS, prior knowledge) on plain listeners with `http2 = true`.
        let h2c = spec.http2 && spec.tls.is_none();
        kinds.push((spec.name.clone(), l, a, kind, h2c));
    }
    drop(first);

    let access_log = opts.access_log;
    let proxy_store = Arc::clone(&store);
    let metrics = Arc::clone(&control.metrics);
    let limiters = Arc::clone(&control.limiters);
    actix_web::rt::spawn(crate::filters::rate_limit::Limiters::evict_forever(
        Arc::downgrade(&limiters),
    ));
    actix_web::rt::spawn(crate::upstream::health::supervise(Arc::downgrade(&store)));
    let counts = Arc::new(listener::ConnCounts::new(
        control.metrics.client_connections.clone(),
    ));
    let keep_alive = opts.keep_alive;
    let request_timeout = opts.client_request_timeout;
    let h2_ping = opts.upstream_h2_ping;
    // Built from its parts rather than with `HttpServer`, so that each accepted socket passes
    // through `listener::admit` (limits, TCP_NODELAY), the TLS handshake on TLS listeners, and
    // `ClientIo` (the head timeout of every request).
    let builder = actix_server::Server::build();
    let shutdown_signal = builder.graceful_shutdown_signal();
    let workers = opts.workers.max(1);
    // One worker's service for one listener: admission, then the TLS handshake on TLS
    // listeners, then HTTP/2 (ALPN `h2`, or the h2c preface where `h2c` is on) or HTTP/1.1.
    let service = move |name: Arc<str>, local: SocketAddr, kind: Kind, h2c: bool| {
        let state = web::Data::new(WorkerState {
            store: Arc::clone(&proxy_store),
            pool: LocalPool::new(h2_ping, Arc::downgrade(&proxy_store)),
            access_log,
            recorder: crate::telemetry::recorder::Recorder::new(Arc::clone(&metrics)),
            limiters: edge::WorkerLimiters::new(Arc::clone(&limiters)),
            buffered: Default::default(),
        });
        // One service per protocol, sharing the worker's state: actix-http's dispatcher calls
        // one for HTTP/1.1, `h2::serve` the other for HTTP/2.
        let expect = {
            let state = state.clone();
            fn_service(move |req: actix_http::Request| expect::call(req, state.clone()))
        };
        let proxy = move || {
            let state = state.clone();
            fn_service(move |req: actix_http::Request| tls::entry(req, state.clone()))
        };
        // This worker's graceful shutdown, for its HTTP/1.1 and HTTP/2 connections.
        let drain = drain::Drain::new(shutdown_signal.clone());
        let http = actix_http::HttpService::build()
            // `ClientIo` times the idle between requests (see `listener`).
            .keep_alive(if keep_alive.is_zero() {
                actix_http::KeepAlive::Disabled
            } else {
                actix_http::KeepAlive::Os
            })
            .client_request_timeout(request_timeout)
            .client_disconnect_timeout(Duration::from_secs(1))
            // A client that closes its side is gone: its request is dropped at once, with
            // its upstream connection and its place under the upstream's limits.
            .h1_allow_half_closed(false)
            .local_addr(local)
            .graceful_shutdown_signal({
                let drain = drain.clone();
                move || drain.started()
            })
            // `100 Continue` only once the body is wanted (see `expect`).
            .expect(expect)
            .on_connect_ext(|io: &listener::ClientIo, ext| {
                // Its facts too: `ConnState::info`.
                ext.insert(std::rc::Rc::clone(io.state()));
            })
            .finish(proxy());
        let store = Arc::clone(&proxy_store);
        let counts = Arc::clone(&counts);
        let metrics = Arc::clone(&metrics);
        fn_factory(move || {
            let h1 = http.new_service(());
            let h2 = proxy().new_service(());
            let (store, counts, metrics) = (
                Arc::clone(&store),
                Arc::clone(&counts),
                Arc::clone(&metrics),
            );
            let (drain, kind, name) = (drain.clone(), kind.clone(), Arc::clone(&name));
            async move {
                let h1 = Rc::new(h1.await.map_err(|_| ())?);
                let h2 = Rc::new(h2.await.map_err(|_| ())?);
                Ok::<_, ()>(fn_service(move |io: tokio::net::TcpStream| {
                    let admitted = listener::admit(io, &store, &counts, &metrics);
                    let settings = h2_settings(&store, keep_alive);
                    let (h1, h2, store, metrics, drain, kind, name) = (
                        Rc::clone(&h1),
                        Rc::clone(&h2),
                        Arc::clone(&store),
                        Arc::clone(&metrics),
                        drain.clone(),
                        kind.clone(),
                        Arc::clone(&name),
                    );
                    // Each poll of the connection shares one clock reading (`util::clock`).
                    crate::util::clock::Turns::new(async move {
                        let a = admitted.ok_or(())?;
                        let peer = a.peer;
                        let (stream, info) = match kind {
                            Kind::Plain { redirect_to } => (
                                listener::Stream::Plain(a.io),
                                listener::ConnInfo {
                                    listener: name,
                                    tls: None,
                                    redirect_to,
                                },
                            ),
                            Kind::Tls(t) => {
                                let (stream, tls) = t
                                    .handshake(a.io, &store, a.header_timeout, &metrics)
                                    .await
                                    .ok_or(())?;
                                (
                                    listener::Stream::Tls(Box::new(stream)),
                                    listener::ConnInfo {
                                        listener: name,
                                        tls: Some(tls),
                                        redirect_to: None,
                                    },
                                )
                            }
                        };
                        let alpn_h2 = info.tls.as_ref().is_some_and(|t| t.h2);
                        let io = listener::client_io(
                            stream,
                            (a.guard, peer),
                            (a.header_timeout, a.send_timeout),
                            (!keep_alive.is_zero()).then_some(keep_alive),
                            info,
                            (&metrics, access_log.then(|| Arc::clone(&store))),
                        );
                        let is_h2 = if alpn_h2 {
                            true
                        } else if h2c {
                            io.starts_with_h2_preface().await.ok_or(())?
                        } else {
                            false
                        };
                        if is_h2 {
                            let info = Rc::clone(io.info());
                            let (io, guard) = io.into_parts();
                            let conn_ext: h2::ConnExt = Rc::new(move |req| {
                                actix_web::HttpMessage::extensions_mut(req)
                                    .insert(Rc::clone(&info));
                            });
                            h2::serve(
                                io,
                                peer,
                                h2,
                                settings,
                                &metrics,
                                drain.started(),
                                Some(conn_ext),
                            )
                            .await;
                            drop(guard);
                            Ok(())
                        } else {
                            h1.call((io, actix_http::Protocol::Http1, peer))
                                .await
                                .map_err(|_| ())
                        }
                    })
                }))
            }
        })
    };
    let mut server = builder
        .workers(workers)
        .shutdown_timeout(grace)
        .disable_signals();
    {
        let service = service.clone();
        // `--listen` takes h2c with prior knowledge, as before listeners existed.
        server = server.listen("rustygate-proxy", listener, move || {
            service(Arc::from(""), addr, Kind::Plain { redirect_to: None }, true)
        })?;
    }
    for (name, l, local, kind, h2c) in kinds {
        let service = service.clone();
        let shared: Arc<str> = Arc::from(name.as_str());
        server = server.listen(format!("rustygate-{name}"), l, move || {
            service(Arc::clone(&shared), local, kind.clone(), h2c)
        })?;
    }
    let proxy = server.run();

    let traffic = Arc::new(Mutex::new(crate::telemetry::traffic::Traffic::new(
        opts.traffic_sample_every,
    )));
    actix_web::rt::spawn(crate::telemetry::traffic::run(
        Arc::downgrade(&traffic),
        Arc::downgrade(&store),
        Arc::clone(&control.metrics),
        opts.traffic_sample_every,
    ));
    let admin_state = web::Data::new(admin::AdminState::new(
        store,
        control,
        admin_addr,
        traffic,
        opts.webhook_max_body,
    ));
    let admin_timeout = opts.admin_request_timeout;
    let per_client = admin_limits::ConnLimit::new(opts.admin_connections_per_client);
    let _ = admin_state
        .control
        .metrics
        .register(Box::new(per_client.metric()));
    let admin = HttpServer::new(move || {
        App::new()
            .app_data(admin_state.clone())
            // Every answer, the probes' and errors' included: nothing here is for a cache, and
            // no answer is to be sniffed into another type (`/ui/` sets its own `no-cache`).
            .wrap(
                actix_web::middleware::DefaultHeaders::new()
                    .add(("cache-control", "no-store"))
                    .add(("x-content-type-options", "nosniff")),
            )
            // A whole request, its body included: actix times only the head, and a webhook
            // body that never ends would hold its connection for ever.
            .wrap_fn(move |req, srv| {
                let call = actix_web::dev::Service::call(srv, req);
                async move {
                    match tokio::time::timeout(admin_timeout, call).await {
                        Ok(res) => res,
                        Err(_) => Err(actix_web::error::ErrorRequestTimeout(
                            "the request did not arrive whole in time",
                        )),
                    }
                }
            })
            .configure(admin::configure)
    })
    .workers(1)
    .max_connections(ADMIN_MAX_CONNECTIONS)
    // Each connection takes a place of its client address's, held until it closes; over the
    // limit it is shut at once, before a byte of its request is read.
    .on_connect(move |conn, ext| {
        let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else {
            return;
        };
        let Ok(peer) = tcp.peer_addr() else {
            return;
        };
        match per_client.admit(peer.ip()) {
            Some(place) => {
                ext.insert(place);
            }
            None => {
                let _ = socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Both);
            }
        }
    })
    .shutdown_timeout(grace)
    .disable_signals()
    .listen(admin_listener)?
    .run();

    Ok(Running {
        addr,
        admin_addr,
        listeners: bound,
        proxy,
        admin,
    })
}

/// HTTP/2 settings for a connection accepted now.
fn h2_settings(store: &SnapshotStore, idle_timeout: Duration) -> h2::Settings {
    let limits = &store.load().limits;
    h2::Settings {
        max_concurrent_streams: limits.http2_max_concurrent_streams,
        max_header_list_size: limits.http2_max_header_list_size,
        max_resets_per_second: limits.http2_max_resets_per_second,
        max_streaming_uploads: limits.http2_max_streaming_uploads,
        stream_window: limits.http2_stream_window,
        connection_window: limits.http2_connection_window,
        header_timeout: limits.header_timeout,
        idle_timeout,
        send_timeout: limits.send_timeout,
    }
}

/// SIGTERM and SIGINT, caught from the moment [`ShutdownSignals::install`] runs: `serve`
/// installs them before the first config load, which may wait on a git host, so that a stop
/// during start-up is not lost (as PID 1 in a container, the signals' default action does
/// nothing). Once installed, a signal waits here until [`ShutdownSignals::recv`] takes it,
/// whichever runtime polls it.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers; must run inside a tokio runtime.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal's name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Serves until SIGTERM or SIGINT (from `signals`), then shuts down gracefully. `on_shutdown`
/// runs when the signal arrives, before the listeners drain (to abandon a reload in progress).
pub async fn serve(
    opts: &ServeOptions,
    store: Arc<SnapshotStore>,
    control: Control,
    mut signals: ShutdownSignals,
    on_shutdown: impl FnOnce() + 'static,
) -> std::io::Result<()> {
    if control.admin_token.is_none() {
        tracing::warn!("no RUSTYGATE_ADMIN_TOKEN: POST /admin/reload is disabled");
        if opts.admin_listen.ip().is_loopback() {
            tracing::warn!(admin = %opts.admin_listen, "no RUSTYGATE_ADMIN_TOKEN: the dashboard (/ui/) and its API answer anyone on this machine (loopback)");
        } else {
            tracing::warn!(admin = %opts.admin_listen, "no RUSTYGATE_ADMIN_TOKEN and the admin listener is not on loopback: the dashboard (/ui/) and its API are disabled");
        }
    }
    if control.webhook_secret.is_none() {
        tracing::warn!(
            "no RUSTYGATE_WEBHOOK_SECRET: POST /hooks/github and /hooks/gitlab are disabled"
        );
    }
    let metrics = Arc::clone(&control.metrics);
    reload_on_sighup(control.reload.clone());
    let running = start(opts, store, control)?;
    tracing::info!(listen = %running.addr, admin = %running.admin_addr, workers = opts.workers, "rustygate listening");
    let handles = running.handles();
    let grace = opts.shutdown_grace;
    actix_web::rt::spawn(async move {
        let signal = signals.recv().await;
        tracing::info!(
            signal,
            grace_seconds = grace.as_secs(),
            "shutting down: no new connections, finishing in-flight requests"
        );
        on_shutdown();
        // actix-server stops the workers after whole seconds, at least one (`start`).
        drain::cut_after(Duration::from_secs(grace.as_secs().max(1)));
        handles.stop(true).await;
    });
    running.wait().await?;
    // The workers drop what the grace cut on their own threads, after the servers have
    // stopped: their access lines (`shutdown`) are written then, or lost with the process.
    let cut = std::time::Instant::now() + Duration::from_secs(1);
    while in_flight(&metrics) > 0.0 && std::time::Instant::now() < cut {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Spans of the last requests: sent before exit (the collector gets a few seconds).
    if !crate::telemetry::trace::flush(Duration::from_secs(5)) {
        tracing::warn!("spans still queued at exit were not exported");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Requests in progress on every worker (`rustygate_in_flight_requests`).
fn in_flight(metrics: &Metrics) -> f64 {
    prometheus::core::Collector::collect(&metrics.in_flight)
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_gauge().get_value())
        .sum()
}

/// SIGHUP reloads the config now (a poll out of turn), as for nginx: without a handler it
/// would end the process at once, requests in flight cut. A source that cannot be reloaded
/// logs that it was asked.
fn reload_on_sighup(reload: Option<tokio::sync::mpsc::Sender<Trigger>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler");
        return;
    };
    actix_web::rt::spawn(async move {
        while hup.recv().await.is_some() {
            match &reload {
                Some(tx) => {
                    tracing::info!("SIGHUP: reloading the config");
                    if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                        tx.try_send(Trigger::Signal)
                    {
                        tracing::warn!("SIGHUP: the reload loop is gone");
                    }
                }
                None => tracing::info!("SIGHUP: this config source is not reloaded"),
            }
        }
    });
}

/// Logs what a reload changed in the `[[listener]]` set: bound at start-up, it needs a
/// restart. Until then a listener keeps its address and, if gone from the config, the TLS
/// settings it last had.
pub fn warn_listener_changes(
    previous: &crate::snapshot::Snapshot,
    next: &crate::snapshot::Snapshot,
) {
    let before: Vec<_> = previous.listeners.iter().map(|l| l.binding()).collect();
    let after: Vec<_> = next.listeners.iter().map(|l| l.binding()).collect();
    if before != after {
        tracing::warn!(
            before = ?before,
            after = ?after,
            "the [[listener]] set changed; it takes effect at the next restart"
        );
    }
}
