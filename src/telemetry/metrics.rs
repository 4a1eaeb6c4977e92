//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! One registry per gateway process (not global), so tests can run several gateways at once.

use prometheus::{
    Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use prometheus::core::Collector;
use prometheus::proto::MetricType;

use super::counts::{Cell, Count, Family, Level, Timing};
use super::recorder::NO_ROUTE;
use crate::snapshot::Snapshot;

/// Latency buckets in seconds: sub-millisecond proxying up to slow upstreams.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    /// Every registered family's name, help and type: those with no series yet are still
    /// listed ([`Metrics::render`]).
    declared: Mutex<Vec<(String, String, MetricType)>>,
    /// The config version whose routes and upstreams have their zero series and no others
    /// ([`Metrics::follow_config`]).
    zeroed: Mutex<Seen>,
    /// Families kept elsewhere labelled by `route` ([`Metrics::register_by_route`]).
    by_route: Mutex<Vec<IntCounterVec>>,
    /// `rustygate_config_reloads_total{result="success|failure"}`
    pub config_reloads: IntCounterVec,
    /// `rustygate_config_commits_refused_total{reason="unsigned-commit|bad-signature"}`:
    /// commits not served under `--require-signed` (each is also a failed reload).
    pub config_commits_refused: IntCounterVec,
    /// Unix time of the last successful reload.
    pub config_last_success: Gauge,
    /// `rustygate_config_info{sha}` = 1 for the config being served.
    /// `rustygate_config_last_reload_successful`: 1 when the last reload served the version it
    /// found (or found nothing new), 0 when the head it found was rejected or could not be
    /// fetched, until one is served.
    pub config_last_reload_ok: IntGauge,
    /// `rustygate_config_stale`: 1 while the config served is a commit from the cache dir that
    /// no fetch has confirmed since start-up (`"stale": true` in `/status`), else 0.
    pub config_stale: IntGauge,
    pub config_info: IntGaugeVec,
    /// `rustygate_requests_total{route,method,status}`; unmatched requests use `route="<none>"`.
    /// Counted per worker ([`super::counts`]), as are `request_duration`, `upstream_duration`,
    /// `in_flight` and `upstream_requests`.
    pub requests: Family<Count>,
    /// `rustygate_request_duration_seconds{route}`: accept to last response byte.
    pub request_duration: Family<Timing>,
    /// `rustygate_upstream_request_duration_seconds{upstream}`: send to response head.
    pub upstream_duration: Family<Timing>,
    /// `rustygate_upstream_errors_total{upstream,kind}`
    pub upstream_errors: IntCounterVec,
    /// `rustygate_in_flight_requests`, counted per worker.
    pub in_flight: Family<Level>,
    /// `rustygate_auth_failures_total{route,reason}`
    pub auth_failures: IntCounterVec,
    /// `rustygate_rate_limited_total{route}`
    pub rate_limited: IntCounterVec,
    /// `rustygate_policy_errors_total{route,reason}`: policy hooks that failed or hit a limit.
    pub policy_errors: IntCounterVec,
    /// `rustygate_upstream_target_healthy{upstream,target}`: 1 when the target takes requests
    /// (healthy and not ejected); set from the served snapshot at each scrape.
    pub target_healthy: IntGaugeVec,
    /// `rustygate_upstream_requests_total{upstream,target,status}`: attempts, by the upstream's
    /// status, or `failed` when no response came.
    pub upstream_requests: Family<Count>,
    /// `rustygate_upstream_retries_total{upstream,reason}`
    pub upstream_retries: IntCounterVec,
    /// `rustygate_upstream_overflow_total{upstream,limit}`: requests turned away by a circuit
    /// breaker (`max_requests`, `max_pending`).
    pub upstream_overflow: IntCounterVec,
    /// `rustygate_upstream_no_target_total{upstream}`: requests answered 503 because no target
    /// was usable.
    pub upstream_no_target: IntCounterVec,
    /// `rustygate_client_connections`: client connections open on the proxy listener.
    pub client_connections: IntGauge,
    /// `rustygate_client_connections_refused_total{limit}`: connections closed at accept by
    /// `max_connections` or `max_connections_per_ip`.
    pub connections_refused: IntCounterVec,
    /// `rustygate_client_timeouts_total{phase}`: client connections closed because the client
    /// was too slow (`header`: a request head, `body`: between request body bytes, `send`:
    /// taking none of its response within `send_timeout`).
    pub client_timeouts: IntCounterVec,
    /// `rustygate_tls_handshakes_total{listener,version,result}`: TLS handshakes on the
    /// listeners with `tls`; `result` is `success`, `failure` or `timeout`, `version` is
    /// `TLSv1_3`/`TLSv1_2`, or `none` when the handshake did not finish.
    pub tls_handshakes: IntCounterVec,
    /// `rustygate_tls_certificate_expiry_timestamp_seconds{name}`: `notAfter` of each served
    /// certificate, `name` = `<listener>/<index>`; set from the served snapshot at each scrape.
    pub tls_certificate_expiry: IntGaugeVec,
    /// `rustygate_http2_goaway_total{reason}`: HTTP/2 client connections the gateway ended
    /// (`idle`, `header_timeout`, `resets`: the rapid-reset cap; `enhance_your_calm`: one of
    /// h2's own flood caps).
    pub http2_goaway: IntCounterVec,
    /// `rustygate_grpc_requests_total{route,grpc_status}`: gRPC calls by their final status
    /// (from the response's trailers or headers; `none` when the call ended without one).
    pub grpc_requests: IntCounterVec,
    /// `rustygate_websocket_connections`: WebSocket tunnels open (101 relayed, not yet closed).
    pub websocket_connections: IntGauge,
    /// `rustygate_config_snapshots_live`: compiled configs in memory, set when rendered.
    config_snapshots_live: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let mut declared = Vec::new();
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "rustygate_config_reloads_total",
                "Config reload attempts, by result.",
            ),
            &["result"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_commits_refused = IntCounterVec::new(
            Opts::new(
                "rustygate_config_commits_refused_total",
                "Commits not served because --require-signed refused their signature, by reason.",
            ),
            &["reason"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_last_success = Gauge::new(
            "rustygate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config reload.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_last_reload_ok = IntGauge::new(
            "rustygate_config_last_reload_successful",
            "1 when the last config reload succeeded (or found nothing new), 0 when the head it \
             found was rejected or could not be fetched; /status names the failing SHA.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_stale = IntGauge::new(
            "rustygate_config_stale",
            "1 while the config served is a commit cached from an earlier run that no fetch has \
             confirmed (the git host unreachable at start-up, or no commit for the ref in the \
             mirror); /status says why.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_info = IntGaugeVec::new(
            Opts::new(
                "rustygate_config_info",
                "The config version being served (value 1).",
            ),
            &["sha"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|_| unreachable_metric())
        };
        let requests: Family<Count> = per_worker(
            "rustygate_requests_total",
            "Requests answered, by route, method and status.",
            &["route", "method", "status"],
        );
        let request_duration: Family<Timing> = per_worker(
            "rustygate_request_duration_seconds",
            "Time from request to the last response byte, by route.",
            &["route"],
        );
        let upstream_duration: Family<Timing> = per_worker(
            "rustygate_upstream_request_duration_seconds",
            "Time from sending upstream to the response head, by upstream.",
            &["upstream"],
        );
        let upstream_errors = counter(
            "rustygate_upstream_errors_total",
            "Upstream requests that failed, by upstream and kind (connect, timeout, upstream, ...).",
            &["upstream", "kind"],
        );
        let in_flight: Family<Level> = per_worker(
            "rustygate_in_flight_requests",
            "Requests being served.",
            &[],
        );
        let auth_failures = counter(
            "rustygate_auth_failures_total",
            "Requests refused by authentication, by route and reason.",
            &["route", "reason"],
        );
        let rate_limited = counter(
            "rustygate_rate_limited_total",
            "Requests refused by a rate limit, by route.",
            &["route"],
        );
        let policy_errors = counter(
            "rustygate_policy_errors_total",
            "Requests failed closed by their policy, by route and reason (operations, call_depth, string_size, array_size, map_size, nesting, timeout, unknown_upstream, invalid_action, runtime_error).",
            &["route", "reason"],
        );
        let target_healthy = IntGaugeVec::new(
            Opts::new(
                "rustygate_upstream_target_healthy",
                "1 when the target takes requests (healthy and not ejected), else 0.",
            ),
            &["upstream", "target"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let upstream_requests: Family<Count> = per_worker(
            "rustygate_upstream_requests_total",
            "Attempts sent to upstream targets, by response status (`failed`: no response).",
            &["upstream", "target", "status"],
        );
        let upstream_retries = counter(
            "rustygate_upstream_retries_total",
            "Retries, by upstream and reason (connect_failure, timeout, reset, or a status).",
            &["upstream", "reason"],
        );
        let upstream_overflow = counter(
            "rustygate_upstream_overflow_total",
            "Requests answered 503 by an upstream's circuit breaker, by limit.",
            &["upstream", "limit"],
        );
        let upstream_no_target = counter(
            "rustygate_upstream_no_target_total",
            "Requests answered 503 because no target of the upstream was usable.",
            &["upstream"],
        );
        let client_connections = IntGauge::new(
            "rustygate_client_connections",
            "Client connections open on the proxy listener.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let connections_refused = counter(
            "rustygate_client_connections_refused_total",
            "Client connections closed at accept by a connection limit (max_connections, max_connections_per_ip).",
            &["limit"],
        );
        let client_timeouts = counter(
            "rustygate_client_timeouts_total",
            "Client requests ended because the client was too slow, by phase (header, body, send).",
            &["phase"],
        );
        let tls_handshakes = counter(
            "rustygate_tls_handshakes_total",
            "TLS handshakes on the proxy listeners, by listener, protocol version and result (success, failure, timeout).",
            &["listener", "version", "result"],
        );
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "rustygate_tls_certificate_expiry_timestamp_seconds",
                "Unix time at which each served listener certificate expires (name: <listener>/<index>).",
            ),
            &["name"],
        )
        .unwrap_or_else(|_| unreachable_metric());
        let http2_goaway = counter(
            "rustygate_http2_goaway_total",
            "HTTP/2 client connections ended by the gateway, by reason (idle, header_timeout, resets, enhance_your_calm).",
            &["reason"],
        );
        let grpc_requests = counter(
            "rustygate_grpc_requests_total",
            "gRPC calls, by route and final grpc-status (none when the call ended without one).",
            &["route", "grpc_status"],
        );
        let websocket_connections = IntGauge::new(
            "rustygate_websocket_connections",
            "WebSocket tunnels open through the gateway.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        let config_snapshots_live = IntGauge::new(
            "rustygate_config_snapshots_live",
            "Compiled configs in memory: the one served, and older ones still held by requests \
             being decided or forwarded (a streamed body or a tunnel holds none). Staying above \
             2 means something keeps old configs alive.",
        )
        .unwrap_or_else(|_| unreachable_metric());
        for c in [
            Box::new(config_reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_commits_refused.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(tls_certificate_expiry.clone()),
            Box::new(http2_goaway.clone()),
            Box::new(grpc_requests.clone()),
            Box::new(websocket_connections.clone()),
            Box::new(config_snapshots_live.clone()),
            Box::new(client_connections.clone()),
            Box::new(connections_refused.clone()),
            Box::new(client_timeouts.clone()),
            Box::new(target_healthy.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(upstream_overflow.clone()),
            Box::new(upstream_no_target.clone()),
            Box::new(config_last_success.clone()),
            Box::new(config_info.clone()),
            Box::new(config_last_reload_ok.clone()),
            Box::new(config_stale.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(in_flight.clone()),
            Box::new(auth_failures.clone()),
            Box::new(rate_limited.clone()),
            Box::new(policy_errors.clone()),
            Box::new(super::sink::DROPPED.clone()),
            Box::new(crate::plugins::ERRORS.clone()),
            Box::new(super::trace::DROPPED.clone()),
            Box::new(crate::filters::jwks::FETCHES.clone()),
        ] {
            declare(&mut declared, &*c);
            let _ = registry.register(c);
        }
        // Series whose labels are known from the start exist from the start, at 0, so that
        // rate() and alerts work before the first event (Prometheus' "avoid missing metrics").
        for (family, values) in [
            (&config_reloads, &["success", "failure"][..]),
            (
                &config_commits_refused,
                &["unsigned-commit", "bad-signature"],
            ),
            (
                &connections_refused,
                &["max_connections", "max_connections_per_ip"],
            ),
            (
                &client_timeouts,
                &["header", "body", "tls_handshake", "send"],
            ),
            (
                &http2_goaway,
                &["idle", "header_timeout", "resets", "enhance_your_calm"],
            ),
            (&*super::trace::DROPPED, &["queue_full", "export_failed"]),
            (
                &*super::sink::DROPPED,
                &super::sink::DropReason::ALL.map(super::sink::DropReason::as_str),
            ),
        ] {
            for v in values {
                family.with_label_values(&[v]);
            }
        }
        Metrics {
            registry,
            declared: Mutex::new(declared),
            zeroed: Mutex::new(Seen::default()),
            by_route: Mutex::default(),
            config_reloads,
            config_commits_refused,
            config_last_success,
            config_info,
            config_last_reload_ok,
            config_stale,
            requests,
            request_duration,
            upstream_duration,
            upstream_errors,
            in_flight,
            auth_failures,
            rate_limited,
            policy_errors,
            target_healthy,
            upstream_requests,
            upstream_retries,
            upstream_overflow,
            upstream_no_target,
            client_connections,
            connections_refused,
            client_timeouts,
            tls_handshakes,
            tls_certificate_expiry,
            http2_goaway,
            grpc_requests,
            websocket_connections,
            config_snapshots_live,
        }
    }

    /// Sets `rustygate_tls_certificate_expiry_timestamp_seconds` from the snapshot being
    /// served: certificates that left the config disappear from the output.
    pub fn observe_certificates(&self, snapshot: &crate::snapshot::Snapshot) {
        self.tls_certificate_expiry.reset();
        for l in &snapshot.listeners {
            for c in l.tls.iter().flat_map(|t| &t.certificates) {
                self.tls_certificate_expiry
                    .with_label_values(&[c.name.as_str()])
                    .set(c.not_after);
            }
        }
    }

    /// Sets `rustygate_upstream_target_healthy` from the snapshot being served: targets that
    /// left the config disappear from the output. Follows the config first
    /// ([`Metrics::follow_config`]).
    pub fn observe_upstreams(&self, snapshot: &Arc<Snapshot>) {
        self.follow_config(snapshot);
        self.target_healthy.reset();
        for u in &snapshot.upstreams {
            for t in &u.targets {
                self.target_healthy
                    .with_label_values(&[u.name.as_str(), t.url.as_str()])
                    .set(i64::from(t.state.available()));
            }
        }
    }

    /// Called with the snapshot served after each reload and at each scrape. The first time a
    /// config version is seen, its upstreams' error, retry, overflow and no-target counters and
    /// its limited routes' `rustygate_rate_limited_total` get their series at 0 (labels known
    /// from the config; kept afterwards like any counter's), and the series of routes,
    /// upstreams and targets no longer in the config go, from every family labelled by them.
    /// Requests still in flight on the replaced snapshot can bring one back; the first call
    /// after that snapshot is freed removes them again.
    pub fn follow_config(&self, snapshot: &Arc<Snapshot>) {
        let mut seen = self.zeroed.lock().unwrap_or_else(|p| p.into_inner());
        if seen.version != snapshot.version.id {
            seen.version.clone_from(&snapshot.version.id);
            let replaced = std::mem::replace(&mut seen.snapshot, Arc::downgrade(snapshot));
            // Checked before the sweep: a snapshot freed by then has no request left to count.
            seen.replaced = (replaced.strong_count() > 0).then_some(replaced);
            self.zero_series(snapshot);
            self.forget_removed(snapshot);
        } else if seen
            .replaced
            .as_ref()
            .is_some_and(|w| w.strong_count() == 0)
        {
            seen.replaced = None;
            self.forget_removed(snapshot);
        }
    }

    fn zero_series(&self, snapshot: &crate::snapshot::Snapshot) {
        for u in &snapshot.upstreams {
            let name = u.name.as_str();
            for kind in UPSTREAM_ERROR_KINDS {
                self.upstream_errors.with_label_values(&[name, kind]);
            }
            for reason in ["connect_failure", "timeout", "reset"] {
                self.upstream_retries.with_label_values(&[name, reason]);
            }
            for limit in ["max_requests", "max_pending"] {
                self.upstream_overflow.with_label_values(&[name, limit]);
            }
            self.upstream_no_target.with_label_values(&[name]);
        }
        for r in snapshot.routes.iter().filter(|r| r.rate_limit.is_some()) {
            self.rate_limited.with_label_values(&[r.name.as_str()]);
        }
    }

    /// Removes every series of a route, upstream or target that `snapshot` does not have from
    /// the families labelled by them, so that what a reload removed neither stays on
    /// `/metrics` at its last value nor holds memory for the gateway's life. Series of what is
    /// still there are not touched: their counts carry on.
    fn forget_removed(&self, snapshot: &Snapshot) {
        let routes: HashSet<&str> = snapshot.routes.iter().map(|r| r.name.as_str()).collect();
        let upstreams: HashSet<&str> = snapshot.upstreams.iter().map(|u| u.name.as_str()).collect();
        let targets: HashSet<(&str, &str)> = snapshot
            .upstreams
            .iter()
            .flat_map(|u| u.targets.iter().map(|t| (u.name.as_str(), t.url.as_str())))
            .collect();
        let gone = |labels: &[(&str, &str)]| {
            let get = |name: &str| labels.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
            let route_gone = get("route").is_some_and(|r| r != NO_ROUTE && !routes.contains(r));
            route_gone
                || match (get("upstream"), get("target")) {
                    (Some(u), Some(t)) => !targets.contains(&(u, t)),
                    (Some(u), None) => !upstreams.contains(u),
                    (None, _) => false,
                }
        };
        self.requests.remove_where(gone);
        self.request_duration.remove_where(gone);
        self.upstream_duration.remove_where(gone);
        self.upstream_requests.remove_where(gone);
        let by_route = self.by_route.lock().unwrap_or_else(|p| p.into_inner());
        for family in by_route.iter().chain([
            &self.upstream_errors,
            &self.auth_failures,
            &self.rate_limited,
            &self.policy_errors,
            &self.upstream_retries,
            &self.upstream_overflow,
            &self.upstream_no_target,
            &self.grpc_requests,
        ]) {
            for f in family.collect() {
                for m in f.get_metric() {
                    let pairs: Vec<(&str, &str)> = m
                        .get_label()
                        .iter()
                        .map(|l| (l.name(), l.value()))
                        .collect();
                    if gone(&pairs) {
                        let _ = family.remove(&pairs.into_iter().collect::<HashMap<_, _>>());
                    }
                }
            }
        }
    }

    /// Records a successful reload to `sha` (replacing the previous info series).
    pub fn reload_succeeded(&self, previous: Option<&str>, sha: &str, at_unix: f64) {
        self.config_reloads.with_label_values(&["success"]).inc();
        self.config_last_success.set(at_unix);
        if let Some(prev) = previous.filter(|p| *p != sha) {
            let _ = self.config_info.remove_label_values(&[prev]);
        }
        self.config_info.with_label_values(&[sha]).set(1);
        self.config_last_reload_ok.set(1);
    }

    pub fn reload_failed(&self) {
        self.config_reloads.with_label_values(&["failure"]).inc();
        self.config_last_reload_ok.set(0);
    }

    /// Sets `rustygate_config_last_reload_successful` without counting a reload: a reload that
    /// found nothing new is as good as the version it found (the served one, or the one that
    /// failed before), and a start-up that serves the commit served before a rejected head is
    /// not.
    pub fn last_reload_ok(&self, ok: bool) {
        self.config_last_reload_ok.set(i64::from(ok));
    }

    /// Sets `rustygate_config_stale`: whether the config served is an unconfirmed cached commit.
    pub fn stale(&self, stale: bool) {
        self.config_stale.set(i64::from(stale));
    }

    /// A commit refused by `--require-signed` (`reason`: `unsigned-commit`, `bad-signature`).
    pub fn commit_refused(&self, reason: &str) {
        self.config_commits_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// Adds a metric kept elsewhere (e.g. by the rate limiters, which outlive snapshots).
    pub fn register(&self, collector: Box<dyn Collector>) -> prometheus::Result<()> {
        let mut declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        declare(&mut declared, &*collector);
        self.registry.register(collector)
    }

    /// [`Metrics::register`] for a counter family labelled by route, kept elsewhere (the rate
    /// limiters'): a reload that removes a route removes its series as it does those of the
    /// families here.
    pub fn register_by_route(&self, family: IntCounterVec) -> prometheus::Result<()> {
        self.register(Box::new(family.clone()))?;
        self.by_route
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(family);
        Ok(())
    }

    /// The text exposition format. A family with no series yet (its labels come from events:
    /// a route, method and status) is listed by its `HELP` and `TYPE` lines alone, as the
    /// Python client does, so that every family is there from start-up.
    pub fn render(&self) -> String {
        let live = crate::snapshot::live_snapshots();
        self.config_snapshots_live
            .set(i64::try_from(live).unwrap_or(i64::MAX));
        let families = self.registry.gather();
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&families, &mut buf);
        let present: std::collections::HashSet<&str> = families.iter().map(|f| f.name()).collect();
        let declared = self.declared.lock().unwrap_or_else(|p| p.into_inner());
        for (name, help, kind) in declared.iter() {
            if present.contains(name.as_str()) {
                continue;
            }
            let help = help.replace('\\', "\\\\").replace('\n', "\\n");
            let kind = match kind {
                MetricType::COUNTER => "counter",
                MetricType::GAUGE => "gauge",
                MetricType::HISTOGRAM => "histogram",
                MetricType::SUMMARY => "summary",
                MetricType::UNTYPED => "untyped",
            };
            buf.extend_from_slice(
                format!("# HELP {name} {help}\n# TYPE {name} {kind}\n").as_bytes(),
            );
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The config version [`Metrics::observe_upstreams`] last saw, and its snapshots.
#[derive(Default)]
struct Seen {
    version: String,
    /// The snapshot served at that scrape.
    snapshot: Weak<Snapshot>,
    /// The one it replaced, while requests may still be counting under it.
    replaced: Option<Weak<Snapshot>>,
}

/// The `kind` values of `rustygate_upstream_errors_total` (`ForwardError::kind` of the errors
/// counted against a target, and a refused response head).
const UPSTREAM_ERROR_KINDS: [&str; 8] = [
    "connect",
    "tls",
    "timeout",
    "upstream",
    "invalid_response",
    "stream_reset",
    "refused",
    "local",
];

/// Notes each family `c` collects (name, help, type), before it has any series.
fn declare(declared: &mut Vec<(String, String, MetricType)>, c: &dyn Collector) {
    for f in c.collect() {
        declared.push((f.name().to_owned(), f.help().to_owned(), f.get_field_type()));
    }
}

/// A family counted per worker ([`super::counts`]).
fn per_worker<C: Cell>(name: &str, help: &str, labels: &[&str]) -> Family<C> {
    Family::new(name, help, labels).unwrap_or_else(|_| unreachable_metric())
}

/// Metric definitions above are constants; prometheus only rejects invalid names.
#[cold]
fn unreachable_metric<T>() -> T {
    panic!("invalid built-in metric definition")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot(routes: &[&str]) -> Arc<Snapshot> {
        Arc::new(crate::telemetry::traffic::tests::snapshot(routes))
    }

    /// A request that was in flight on the replaced snapshot and counts after the sweep brings
    /// its removed route's series back; it goes at the first scrape after that snapshot is
    /// freed, and the live route's count is never touched.
    #[test]
    fn a_series_counted_late_under_a_replaced_snapshot_goes_once_it_is_freed() {
        let m = Metrics::new();
        let old = snapshot(&["api", "old"]);
        m.observe_upstreams(&old);
        let count = |route: &str| m.policy_errors.with_label_values(&[route, "timeout"]);
        count("api").inc();
        count("old").inc();
        let new = snapshot(&["api"]);
        m.observe_upstreams(&new);
        let routes = || -> Vec<String> {
            m.policy_errors.collect()[0]
                .get_metric()
                .iter()
                .map(|s| {
                    let route = s.get_label().iter().find(|l| l.name() == "route").unwrap();
                    format!("{} {}", route.value(), s.get_counter().get_value())
                })
                .collect()
        };
        assert_eq!(routes(), ["api 1"]);
        // Late, under `old`, which a request still holds.
        count("old").inc();
        m.observe_upstreams(&new);
        assert_eq!(routes().len(), 2, "{:?}", routes());
        drop(old);
        m.observe_upstreams(&new);
        assert_eq!(routes(), ["api 1"]);
    }
}
