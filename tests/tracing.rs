//! OpenTelemetry tracing against a real OTLP/HTTP receiver on loopback, which decodes what the
//! gateway exports with the official protobuf types: span names, kinds and parent links, the
//! client's trace continued, attributes, error status, retries as client spans, sampling that a
//! client cannot force, per-route settings, and collectors that are down, stalled or answer
//! garbage without any response changing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(sampled: bool) -> String {
    format!(
        "00-{CLIENT_TRACE}-{CLIENT_SPAN}-{}",
        if sampled { "01" } else { "00" }
    )
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    /// (path, content-type, content-encoding) of each export.
    posts: Vec<(String, String, String)>,
    service_names: Vec<String>,
}

/// An OTLP/HTTP collector on 127.0.0.1:0 that keeps every span it is sent.
struct Collector {
    backend: Backend,
    got: Arc<Mutex<Received>>,
}

impl Collector {
    fn start() -> Collector {
        let got = Arc::new(Mutex::new(Received::default()));
        let sink = Arc::clone(&got);
        let backend = Backend::start(move |req: Request<hyper::body::Incoming>| {
            let sink = Arc::clone(&sink);
            async move {
                let path = req.uri().path().to_owned();
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default()
                };
                let (ct, encoding) = (header("content-type"), header("content-encoding"));
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let body = match encoding.as_str() {
                    "" => body.to_vec(),
                    "gzip" => {
                        let mut out = Vec::new();
                        flate2::read::GzDecoder::new(&body[..])
                            .read_to_end(&mut out)
                            .expect("a valid gzip body");
                        out
                    }
                    other => panic!("unexpected content-encoding {other}"),
                };
                let decoded =
                    ExportTraceServiceRequest::decode(&body[..]).expect("valid OTLP protobuf");
                let mut g = sink.lock().unwrap();
                g.posts.push((path, ct, encoding));
                for rs in decoded.resource_spans {
                    for kv in rs.resource.iter().flat_map(|r| &r.attributes) {
                        if kv.key == "service.name"
                            && let Some(Any::StringValue(s)) =
                                kv.value.as_ref().and_then(|v| v.value.clone())
                        {
                            g.service_names.push(s);
                        }
                    }
                    for ss in rs.scope_spans {
                        g.spans.extend(ss.spans);
                    }
                }
                Response::builder()
                    .header("content-type", "application/x-protobuf")
                    .body(full(""))
                    .unwrap()
            }
        });
        Collector { backend, got }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.backend.addr)
    }

    /// Waits for the spans of trace `trace_id` (hex) to reach `n`.
    fn wait_for(&self, trace_id: &str, n: usize) -> Vec<Span> {
        let ok = wait_until(Duration::from_secs(20), || {
            self.of_trace(trace_id).len() >= n
        });
        let spans = self.of_trace(trace_id);
        assert!(ok, "expected {n} spans of {trace_id}, got {}", spans.len());
        spans
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Span> {
        let g = self.got.lock().unwrap();
        g.spans
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Span> {
        self.got.lock().unwrap().spans.clone()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<Any> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn str_attr(s: &Span, key: &str) -> Option<String> {
    match attr(s, key) {
        Some(Any::StringValue(v)) => Some(v),
        _ => None,
    }
}

fn int_attr(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key) {
        Some(Any::IntValue(v)) => Some(v),
        _ => None,
    }
}

fn kind(s: &Span) -> SpanKind {
    SpanKind::try_from(s.kind).unwrap()
}

fn status_code(s: &Span) -> StatusCode {
    s.status.as_ref().map_or(StatusCode::Unset, |st| {
        StatusCode::try_from(st.code).unwrap()
    })
}

fn gateway_toml(endpoint: &str, extra: &str) -> String {
    format!("[tracing]\nendpoint = \"{endpoint}\"\nservice_name = \"edge-test\"\n{extra}\n")
}

/// GET `path` with extra headers; status, body, and the headers the echo backend saw.
fn call(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http(&gw.addr.to_string(), "GET", path, headers, b"").expect("gateway answered")
}

/// The value of `name` among the request headers an echo backend reports.
fn echoed(body: &str, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["headers"]
        .as_array()?
        .iter()
        .find_map(|pair| (pair[0].as_str()? == name).then(|| pair[1].as_str().unwrap().to_owned()))
}

/// A traceparent's (trace id, parent id, flags).
fn parse_tp(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[test]
fn collectors_that_are_down_stalled_or_answer_garbage_change_no_response() {
    let backend = Backend::fixed(200, "hello");
    // Accepts and never answers.
    let stalled = Backend::start(|_req| std::future::pending::<Response<Body>>());
    // Answers with bytes that are not HTTP.
    let garbage = raw_backend(b"\x00\x01 this is not http \xff\r\n\r\n");
    // Answers HTTP 500 with a body that is not protobuf.
    let refusing = Backend::fixed(500, "\u{1}\u{2}nope");
    let dead = format!("http://127.0.0.1:{}/v1/traces", dead_port());
    let before = dropped_export_failed();
    for endpoint in [
        dead,
        format!("http://{}/v1/traces", stalled.addr),
        format!("http://{garbage}/v1/traces"),
        format!("http://{}/v1/traces", refusing.addr),
    ] {
        let mut files = proxy_all(&backend.url(), "");
        files.push((
            "gateway.toml",
            gateway_toml(&endpoint, "timeout = \"1s\"\nsample_ratio = 1.0"),
        ));
        let gw = Gateway::start(&as_refs(&files));
        for i in 0..20 {
            let (status, body) = call(&gw, &format!("/x/{i}"), &[]);
            assert_eq!((status, body.as_str()), (200, "hello"), "via {endpoint}");
        }
    }
    // The failures are seen and counted, not hidden.
    assert!(
        wait_until(Duration::from_secs(30), || dropped_export_failed() > before),
        "no failed export was counted"
    );
}

fn dropped_export_failed() -> u64 {
    rustygate::telemetry::trace::DROPPED
        .with_label_values(&["export_failed"])
        .get()
}

#[test]
fn server_and_client_spans_continue_the_clients_trace_with_the_documented_attributes() {
    let collector = Collector::start();
    let backend = Backend::echo();
    let files = vec![
        (
            "routes/orders.toml",
            "[[route]]\nname = \"orders\"\npath = \"/orders/{id}\"\nupstream = \"be\"\n".to_owned(),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [\"{}\"]\n", backend.url()),
        ),
        (
            "gateway.toml",
            gateway_toml(
                &collector.endpoint(),
                "sample_ratio = 1.0\ntrust_incoming_sampled = true",
            ),
        ),
    ];
    let gw = Gateway::start(&as_refs(&files));
    let tp = traceparent(true);
    let (status, body) = call(
        &gw,
        "/orders/7?token=secret",
        &[("traceparent", &tp), ("user-agent", "trace-test/1")],
    );
    assert_eq!(status, 200);
    let sent = echoed(&body, "traceparent").expect("the upstream got a traceparent");
    let (trace, parent, flags) = parse_tp(&sent);
    assert_eq!(
        trace, CLIENT_TRACE,
        "the client's trace is continued upstream"
    );
    assert_ne!(
        parent, CLIENT_SPAN,
        "the upstream's parent is the gateway's span"
    );
    assert_eq!(flags, "01");

    let spans = collector.wait_for(CLIENT_TRACE, 2);
    assert_eq!(spans.len(), 2, "one server span, one client span");
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    let client = spans.iter().find(|s| kind(s) == SpanKind::Client).unwrap();
    // Span.flags: the W3C trace flags (sampled) in bits 0-7.
    assert_eq!((server.flags & 0xff, client.flags & 0xff), (1, 1));
    assert_eq!(server.name, "GET /orders/{id}");
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    assert_eq!(client.name, "GET");
    assert_eq!(hex(&client.parent_span_id), hex(&server.span_id));
    assert_eq!(
        hex(&client.span_id),
        parent,
        "the upstream's parent is the client span"
    );
    assert!(server.start_time_unix_nano <= client.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);
    assert!(server.start_time_unix_nano > 0);

    for (key, want) in [
        ("http.request.method", "GET"),
        ("url.path", "/orders/7"),
        ("url.scheme", "http"),
        ("http.route", "/orders/{id}"),
        ("rustygate.route", "orders"),
        ("rustygate.upstream", "be"),
        ("client.address", "127.0.0.1"),
        ("network.peer.address", "127.0.0.1"),
        ("network.protocol.version", "1.1"),
        ("user_agent.original", "trace-test/1"),
    ] {
        assert_eq!(str_attr(server, key).as_deref(), Some(want), "{key}");
    }
    assert_eq!(
        str_attr(server, "rustygate.config.sha"),
        Some(gw.store.load().version.id.clone())
    );
    assert_eq!(int_attr(server, "http.response.status_code"), Some(200));
    assert_eq!(str_attr(server, "server.address").as_deref(), Some("test"));
    assert_eq!(
        int_attr(server, "server.port"),
        None,
        "`Host: test` names no port"
    );
    assert_eq!(
        str_attr(server, "url.query"),
        None,
        "queries are not recorded"
    );
    assert_eq!(status_code(server), StatusCode::Unset);
    assert_eq!(
        str_attr(client, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        int_attr(client, "server.port"),
        Some(i64::from(backend.addr.port()))
    );
    assert_eq!(int_attr(client, "http.response.status_code"), Some(200));
    assert_eq!(int_attr(client, "http.request.resend_count"), None);

    let g = collector.got.lock().unwrap();
    assert!(
        g.posts.iter().all(|(p, ct, encoding)| p == "/v1/traces"
            && ct == "application/x-protobuf"
            && encoding.is_empty()),
        "uncompressed unless configured: {:?}",
        g.posts
    );
    assert!(g.service_names.iter().all(|s| s == "edge-test"));
}

#[test]
fn a_5xx_marks_the_server_span_as_an_error_and_a_4xx_does_not() {
    let collector = Collector::start();
    let backend = Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let status = if req.uri().path() == "/fail" {
            503
        } else {
            404
        };
        Response::builder().status(status).body(full("x")).unwrap()
    });
    let mut files = proxy_all(&backend.url(), "");
    files.push((
        "gateway.toml",
        gateway_toml(
            &collector.endpoint(),
            "sample_ratio = 1.0\ntrust_incoming_sampled = true",
        ),
    ));
    let gw = Gateway::start(&as_refs(&files));
    let five = "0af7651916cd43dd8448eb211c80319c";
    let four = "1af7651916cd43dd8448eb211c80319c";
    let tp = |t: &str| format!("00-{t}-{CLIENT_SPAN}-01");
    assert_eq!(call(&gw, "/fail", &[("traceparent", &tp(five))]).0, 503);
    assert_eq!(call(&gw, "/missing", &[("traceparent", &tp(four))]).0, 404);

    let spans = collector.wait_for(five, 2);
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    assert_eq!(server.name, "GET /*");
    assert_eq!(status_code(server), StatusCode::Error);
    assert_eq!(str_attr(server, "error.type").as_deref(), Some("503"));
    assert_eq!(int_attr(server, "http.response.status_code"), Some(503));

    let spans = collector.wait_for(four, 2);
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    assert_eq!(
        status_code(server),
        StatusCode::Unset,
        "4xx is the client's error"
    );
    assert_eq!(str_attr(server, "error.type"), None);
    let client = spans.iter().find(|s| kind(s) == SpanKind::Client).unwrap();
    assert_eq!(int_attr(client, "http.response.status_code"), Some(404));
}

#[test]
fn each_retry_is_a_client_span_of_its_own() {
    let collector = Collector::start();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let backend = Backend::start(move |_req| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let status = if n == 0 { 503 } else { 200 };
            Response::builder().status(status).body(full("r")).unwrap()
        }
    });
    let mut files = proxy_to(
        &[backend.url()],
        "retries = { attempts = 1, on = [\"503\"], backoff = \"1ms\", budget_percent = 100 }",
        "",
    );
    files.push((
        "gateway.toml",
        gateway_toml(
            &collector.endpoint(),
            "sample_ratio = 1.0\ntrust_incoming_sampled = true",
        ),
    ));
    let gw = Gateway::start(&as_refs(&files));
    assert_eq!(
        call(&gw, "/r", &[("traceparent", &traceparent(true))]).0,
        200
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);

    let spans = collector.wait_for(CLIENT_TRACE, 3);
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    let mut clients: Vec<&Span> = spans
        .iter()
        .filter(|s| kind(s) == SpanKind::Client)
        .collect();
    clients.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(clients.len(), 2);
    for c in &clients {
        assert_eq!(hex(&c.parent_span_id), hex(&server.span_id));
    }
    assert_ne!(clients[0].span_id, clients[1].span_id);
    assert_eq!(int_attr(clients[0], "http.response.status_code"), Some(503));
    assert_eq!(int_attr(clients[0], "http.request.resend_count"), None);
    assert_eq!(status_code(clients[0]), StatusCode::Error);
    assert_eq!(int_attr(clients[1], "http.response.status_code"), Some(200));
    assert_eq!(int_attr(clients[1], "http.request.resend_count"), Some(1));
    assert_eq!(
        status_code(server),
        StatusCode::Unset,
        "the request succeeded"
    );
}

/// Three routes: `quiet` (the gateway's ratio 0), `health` (`tracing = false`) and `marker`
/// (its own ratio 1.0). A marker request sent after the others is exported; once it has
/// arrived, whatever the earlier requests would have exported has too.
fn sampling_gateway(collector: &Collector, backend: &Backend, extra: &str) -> Gateway {
    let files = vec![
        (
            "routes/r.toml",
            "[[route]]\nname = \"quiet\"\nprefix = \"/quiet\"\nupstream = \"be\"\n\n\
             [[route]]\nname = \"health\"\npath = \"/healthz\"\nupstream = \"be\"\ntracing = false\n\n\
             [[route]]\nname = \"marker\"\nprefix = \"/marker\"\nupstream = \"be\"\n\
             tracing = { sample_ratio = 1.0, record_query = true }\n"
                .to_owned(),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [\"{}\"]\n", backend.url()),
        ),
        (
            "gateway.toml",
            gateway_toml(&collector.endpoint(), &format!("sample_ratio = 0.0\n{extra}")),
        ),
    ];
    Gateway::start(&as_refs(&files))
}

fn marker(gw: &Gateway, collector: &Collector, trace: &str) -> Span {
    let tp = format!("00-{trace}-{CLIENT_SPAN}-01");
    let (status, _) = call(gw, "/marker?q=1", &[("traceparent", &tp)]);
    assert_eq!(status, 200);
    let spans = collector.wait_for(trace, 2);
    spans
        .into_iter()
        .find(|s| kind(s) == SpanKind::Server)
        .unwrap()
}

#[test]
fn a_clients_sampled_flag_does_not_force_recording_unless_trusted() {
    let backend = Backend::echo();
    let collector = Collector::start();
    let gw = sampling_gateway(&collector, &backend, "");
    let (status, body) = call(&gw, "/quiet/a", &[("traceparent", &traceparent(true))]);
    assert_eq!(status, 200);
    let (trace, _, flags) = parse_tp(&echoed(&body, "traceparent").unwrap());
    assert_eq!(
        trace, CLIENT_TRACE,
        "the trace id is continued even when not recorded"
    );
    assert_eq!(
        flags, "00",
        "the upstream is told the request is not recorded"
    );
    // A request without a trace gets one, and the upstream always receives a traceparent.
    let (_, body) = call(&gw, "/quiet/b", &[]);
    let (fresh, _, _) = parse_tp(&echoed(&body, "traceparent").unwrap());
    assert_ne!(fresh, CLIENT_TRACE);
    assert_eq!(fresh.len(), 32);

    let m = marker(&gw, &collector, "2af7651916cd43dd8448eb211c80319c");
    assert_eq!(
        str_attr(&m, "url.query").as_deref(),
        Some("q=1"),
        "the route opted in"
    );
    assert!(
        collector.of_trace(CLIENT_TRACE).is_empty() && collector.of_trace(&fresh).is_empty(),
        "ratio 0 exported spans"
    );

    // Trusted: the client's flag decides.
    let collector = Collector::start();
    let trusting = sampling_gateway(&collector, &backend, "trust_incoming_sampled = true");
    assert_eq!(
        call(
            &trusting,
            "/quiet/a",
            &[("traceparent", &traceparent(true))]
        )
        .0,
        200
    );
    let spans = collector.wait_for(CLIENT_TRACE, 2);
    assert_eq!(spans.len(), 2);
}

#[test]
fn tracestate_and_baggage_go_upstream_only_with_their_trace_and_within_the_w3c_limits() {
    let backend = Backend::echo();
    let collector = Collector::start();
    let gw = sampling_gateway(&collector, &backend, "");
    let tp = traceparent(true);
    let bad_tp = tp.replace("-01", "-0x");
    let list = |n: usize, prefix: &str| {
        (0..n)
            .map(|i| format!("{prefix}{i}=v{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // Not continued (a traceparent that does not parse, or two of them): a new trace, and the
    // client's tracestate is not the upstream's business.
    for headers in [
        vec![
            ("traceparent", bad_tp.as_str()),
            ("tracestate", "vendor=abc"),
        ],
        vec![
            ("traceparent", tp.as_str()),
            ("traceparent", tp.as_str()),
            ("tracestate", "vendor=abc"),
        ],
    ] {
        let (status, body) = call(&gw, "/quiet/1", &headers);
        assert_eq!(status, 200, "{body}");
        let (trace, _, _) = parse_tp(&echoed(&body, "traceparent").unwrap());
        assert_ne!(
            trace, CLIENT_TRACE,
            "{headers:?}: the client's trace was continued"
        );
        assert_eq!(echoed(&body, "tracestate"), None, "{headers:?}");
    }
    // Continued: tracestate goes with it, cut to 32 members; baggage to 180.
    let (state, baggage) = (list(40, "k"), list(200, "b"));
    let (status, body) = call(
        &gw,
        "/quiet/1",
        &[
            ("traceparent", &tp),
            ("tracestate", &state),
            ("baggage", &baggage),
        ],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        parse_tp(&echoed(&body, "traceparent").unwrap()).0,
        CLIENT_TRACE
    );
    assert_eq!(echoed(&body, "tracestate"), Some(list(32, "k")));
    assert_eq!(echoed(&body, "baggage"), Some(list(180, "b")));
    // Within the limits: as the client sent it.
    let (_, body) = call(
        &gw,
        "/quiet/1",
        &[
            ("traceparent", &tp),
            ("tracestate", "a=1,b=2"),
            ("baggage", "x=1"),
        ],
    );
    assert_eq!(echoed(&body, "tracestate").as_deref(), Some("a=1,b=2"));
    assert_eq!(echoed(&body, "baggage").as_deref(), Some("x=1"));
}

#[test]
fn a_route_with_tracing_false_is_never_recorded_but_still_propagates() {
    let backend = Backend::echo();
    let collector = Collector::start();
    let gw = sampling_gateway(&collector, &backend, "trust_incoming_sampled = true");
    let (status, body) = call(&gw, "/healthz", &[("traceparent", &traceparent(true))]);
    assert_eq!(status, 200);
    let (trace, _, flags) = parse_tp(&echoed(&body, "traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "00"));
    marker(&gw, &collector, "3af7651916cd43dd8448eb211c80319c");
    assert!(
        collector.of_trace(CLIENT_TRACE).is_empty(),
        "the health route was traced"
    );
    assert!(
        collector
            .all()
            .iter()
            .all(|s| str_attr(s, "rustygate.route").as_deref() != Some("health"))
    );
}

#[test]
fn ratio_zero_exports_nothing_and_every_access_line_still_has_ids() {
    let backend = Backend::echo();
    let collector = Collector::start();
    let mut files = proxy_all(&backend.url(), "");
    files.push((
        "gateway.toml",
        gateway_toml(&collector.endpoint(), "sample_ratio = 0.0"),
    ));
    let dir = repo(&as_refs(&files));
    let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], &[]);
    let tp = traceparent(true);
    let (status, _) = http(&gw.listen, "GET", "/with", &[("traceparent", &tp)], b"").unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(&gw.listen, "GET", "/without", &[], b"").unwrap();
    assert_eq!(status, 200);
    // A graceful stop flushes the exporter: what is not at the collector when the process has
    // exited was never going to be.
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut gw = gw;
    assert!(wait_until(Duration::from_secs(20), || matches!(
        gw.child.try_wait(),
        Ok(Some(_))
    )));
    // The stderr reader may still be copying the last lines.
    wait_until(Duration::from_secs(5), || {
        gw.logs.lock().unwrap().contains("\"message\":\"stopped\"")
    });
    assert!(collector.all().is_empty(), "ratio 0 exported spans");
    let logs = gw.logs.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| l.contains("\"target\":\"rustygate::access\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{logs}");
    let with = lines.iter().find(|l| l["path"] == "/with").unwrap();
    assert_eq!(with["trace_id"], CLIENT_TRACE);
    let without = lines.iter().find(|l| l["path"] == "/without").unwrap();
    for l in [with, without] {
        let t = l["trace_id"].as_str().unwrap();
        let s = l["span_id"].as_str().unwrap();
        assert_eq!((t.len(), s.len()), (32, 16), "{l}");
        assert!(t.bytes().chain(s.bytes()).all(|b| b.is_ascii_hexdigit()));
        assert_ne!(s, CLIENT_SPAN, "the span id is the gateway's own");
    }
    assert_ne!(without["trace_id"], CLIENT_TRACE);
}

#[test]
fn bad_tracing_config_is_a_located_error() {
    let dir = repo(&[(
        "gateway.toml",
        "[tracing]\nendpoint = \"localhost:4318\"\nsample_ratio = 1.5\npropagators = [\"tracecontext\", \"b4\"]\n",
    )]);
    let compiled =
        rustygate::compile::compile_dir(dir.path(), &rustygate::compile::CompileOptions::default())
            .unwrap();
    assert!(compiled.snapshot.is_none());
    let text = compiled.diagnostics.render_human(&compiled.files);
    assert!(text.contains("gateway.toml:2:"), "{text}");
    assert!(text.contains("not an http(s) URL"), "{text}");
    assert!(text.contains("between 0.0 and 1.0"), "{text}");
    let dir = repo(&[(
        "gateway.toml",
        "[tracing]\npropagators = [\"tracecontext\", \"b4\"]\n",
    )]);
    let compiled =
        rustygate::compile::compile_dir(dir.path(), &rustygate::compile::CompileOptions::default())
            .unwrap();
    let text = compiled.diagnostics.render_human(&compiled.files);
    assert!(text.contains("unknown propagator `b4`"), "{text}");
    assert!(text.contains("gateway.toml:2:"), "{text}");
}

#[test]
fn compression_gzip_from_the_config_or_the_otel_variables_sends_gzipped_batches() {
    let backend = Backend::echo();
    let tp = traceparent(true);
    // The config key, in process.
    let collector = Collector::start();
    let mut files = proxy_all(&backend.url(), "");
    files.push((
        "gateway.toml",
        gateway_toml(&collector.endpoint(), "compression = \"gzip\""),
    ));
    let gw = Gateway::start(&as_refs(&files));
    assert_eq!(call(&gw, "/zipped", &[("traceparent", &tp)]).0, 200);
    let spans = collector.wait_for(CLIENT_TRACE, 2);
    assert!(spans.iter().any(|s| s.name == "GET /*"), "{spans:?}");
    let posts = collector.got.lock().unwrap().posts.clone();
    assert!(!posts.is_empty());
    assert!(
        posts.iter().all(|(_, _, encoding)| encoding == "gzip"),
        "{posts:?}"
    );
    drop(gw);

    // The standard variables, in a process of its own (the environment is per process): the
    // traces variable wins over the general one, the config key over both, and a value the
    // exporter does not know is a warning and no compression.
    for (config, envs, want, warned) in [
        (
            "",
            &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")][..],
            "gzip",
            false,
        ),
        (
            "",
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ][..],
            "",
            false,
        ),
        (
            "compression = \"none\"",
            &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")][..],
            "",
            false,
        ),
        (
            "",
            &[("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd")][..],
            "",
            true,
        ),
    ] {
        let collector = Collector::start();
        let mut files = proxy_all(&backend.url(), "");
        files.push(("gateway.toml", gateway_toml(&collector.endpoint(), config)));
        let dir = repo(&as_refs(&files));
        let gw = GatewayProcess::start(&["--repo", dir.path().to_str().unwrap()], envs);
        let (status, _) = http(&gw.listen, "GET", "/env", &[("traceparent", &tp)], b"").unwrap();
        assert_eq!(status, 200);
        collector.wait_for(CLIENT_TRACE, 2);
        let posts = collector.got.lock().unwrap().posts.clone();
        assert!(
            posts.iter().all(|(_, _, encoding)| encoding == want),
            "{config} {envs:?}: {posts:?}"
        );
        let logs = gw.logs.lock().unwrap().clone();
        assert_eq!(
            logs.contains("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=`zstd` is not a compression"),
            warned,
            "{logs}"
        );
    }
}

/// IPv6 and dual-stack addresses in spans are IP addresses as the semantic conventions give
/// them: `server.address` of a `Host: [::1]:8080` request and of a `http://[::1]:port` target
/// is `::1` (before: `[::1]`, brackets and all), and an IPv4 client of a dual-stack `[::]`
/// listener is `127.0.0.1` in `network.peer.address` as in `client.address` (before:
/// `::ffff:127.0.0.1`).
#[test]
fn ipv6_and_ipv4_mapped_addresses_are_plain_ip_addresses_in_spans() {
    let collector = Collector::start();
    let backend = Backend::echo_at("[::1]:0".parse().unwrap());
    let mut files = proxy_all(&backend.url(), "");
    files.push((
        "gateway.toml",
        gateway_toml(
            &collector.endpoint(),
            "sample_ratio = 1.0\ntrust_incoming_sampled = true\n\n\
             [[listener]]\nname = \"dual\"\naddress = \"[::]:0\"",
        ),
    ));
    let gw = Gateway::start(&as_refs(&files));
    let port = gw.listener("dual").port();
    let tp = traceparent(true);
    let answer = raw(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        format!(
            "GET /x HTTP/1.1\r\nHost: [::1]:8080\r\ntraceparent: {tp}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let spans = collector.wait_for(CLIENT_TRACE, 2);
    let server = spans.iter().find(|s| kind(s) == SpanKind::Server).unwrap();
    let client = spans.iter().find(|s| kind(s) == SpanKind::Client).unwrap();
    for (key, want) in [
        ("server.address", "::1"),
        ("client.address", "127.0.0.1"),
        ("network.peer.address", "127.0.0.1"),
    ] {
        assert_eq!(str_attr(server, key).as_deref(), Some(want), "{key}");
    }
    assert_eq!(int_attr(server, "server.port"), Some(8080));
    assert_eq!(str_attr(client, "server.address").as_deref(), Some("::1"));
    assert_eq!(
        int_attr(client, "server.port"),
        Some(i64::from(backend.addr.port()))
    );
}
