//! `https://` targets and HTTP/2 upstreams against real backends on loopback: a CA, server and
//! client certificates made with rcgen for each test, TLS backends on tokio-rustls + hyper, and
//! h2c backends on hyper's HTTP/2 server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyper::Response;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustygate::server::ServeOptions;

/// A test CA with a server certificate (for `localhost`, `orders.internal` and 127.0.0.1) and
/// a client certificate, all in PEM.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new() -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "rustygate test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, "leaf");
            p.extended_key_usages = vec![usage];
            p.use_authority_key_identifier_extension = true;
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec![
                "localhost".into(),
                "orders.internal".into(),
                "127.0.0.1".into(),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(vec!["gateway".into()], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca: ca_pem,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// A server config; `require_client_cert` turns on mutual TLS with this CA.
    fn server_config(&self, alpn: &[&[u8]], require_client_cert: bool) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.server_cert.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.server_key.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(self.ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: http::Version,
    /// SNI of the connection (TLS only).
    sni: Option<String>,
    client_cert: bool,
    alpn: Option<Vec<u8>>,
}

/// How a backend speaks.
enum Mode {
    Tls { config: Arc<rustls::ServerConfig> },
    H2c,
}

/// A backend on 127.0.0.1:0 that records every request and answers `200 <HTTP version>`
/// after `delay`.
struct TestBackend {
    addr: SocketAddr,
    /// TCP connections accepted.
    connections: Arc<AtomicUsize>,
    /// TLS handshakes that failed.
    handshake_failures: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Most requests in progress at once.
    max_concurrent: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl TestBackend {
    fn start(mode: Mode, delay: Duration) -> TestBackend {
        TestBackend::start_at("127.0.0.1:0".parse().unwrap(), mode, delay)
    }

    /// A backend on a given address (to bring a stopped backend back on its port).
    fn start_at(addr: SocketAddr, mode: Mode, delay: Duration) -> TestBackend {
        // A backend just stopped may still hold the port for a moment.
        let mut bound = None;
        assert!(
            wait_until(Duration::from_secs(5), || {
                bound = std::net::TcpListener::bind(addr).ok();
                bound.is_some()
            }),
            "{addr} is free"
        );
        let listener = bound.unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let connections = Arc::new(AtomicUsize::new(0));
        let handshake_failures = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let max_concurrent = Arc::new(AtomicUsize::new(0));
        let b = TestBackend {
            addr,
            connections: Arc::clone(&connections),
            handshake_failures: Arc::clone(&handshake_failures),
            seen: Arc::clone(&seen),
            max_concurrent: Arc::clone(&max_concurrent),
            _stop: stop,
        };
        let mode = Arc::new(mode);
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        connections.fetch_add(1, Ordering::SeqCst);
                        let (mode, seen, active, max) = (
                            Arc::clone(&mode),
                            Arc::clone(&seen),
                            Arc::clone(&active),
                            Arc::clone(&max_concurrent),
                        );
                        let failures = Arc::clone(&handshake_failures);
                        tokio::spawn(async move {
                            let record =
                                move |sni: Option<String>,
                                      client_cert: bool,
                                      alpn: Option<Vec<u8>>| {
                                    hyper::service::service_fn(move |req: hyper::Request<_>| {
                                        let (seen, active, max) = (
                                            Arc::clone(&seen),
                                            Arc::clone(&active),
                                            Arc::clone(&max),
                                        );
                                        let entry = Seen {
                                            path: req.uri().path().to_owned(),
                                            version: req.version(),
                                            sni: sni.clone(),
                                            client_cert,
                                            alpn: alpn.clone(),
                                        };
                                        async move {
                                            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                                            max.fetch_max(now, Ordering::SeqCst);
                                            tokio::time::sleep(delay).await;
                                            active.fetch_sub(1, Ordering::SeqCst);
                                            let body = format!("{:?}", entry.version);
                                            let trailers = entry.path == "/trailers";
                                            seen.lock().unwrap().push(entry);
                                            if !trailers {
                                                return Ok::<_, Infallible>(Response::new(full(
                                                    body,
                                                )));
                                            }
                                            // Like a gRPC answer: the status comes in trailers.
                                            let mut t = http::HeaderMap::new();
                                            t.insert(
                                                "grpc-status",
                                                http::HeaderValue::from_static("0"),
                                            );
                                            let frames = vec![
                                                Ok(hyper::body::Frame::data(bytes::Bytes::from(
                                                    body,
                                                ))),
                                                Ok(hyper::body::Frame::trailers(t)),
                                            ];
                                            let stream = futures_util::stream::iter(frames);
                                            Ok(Response::new(http_body_util::BodyExt::boxed(
                                                http_body_util::StreamBody::new(stream),
                                            )))
                                        }
                                    })
                                };
                            match &*mode {
                                Mode::H2c => {
                                    let _ = hyper::server::conn::http2::Builder::new(
                                        hyper_util::rt::TokioExecutor::new(),
                                    )
                                    .serve_connection(
                                        hyper_util::rt::TokioIo::new(stream),
                                        record(None, false, None),
                                    )
                                    .await;
                                }
                                Mode::Tls { config } => {
                                    let acceptor =
                                        tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                                    let Ok(tls) = acceptor.accept(stream).await else {
                                        failures.fetch_add(1, Ordering::SeqCst);
                                        return;
                                    };
                                    let (_, session) = tls.get_ref();
                                    let sni = session.server_name().map(str::to_owned);
                                    let client_cert = session.peer_certificates().is_some();
                                    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
                                    let h2 = alpn.as_deref() == Some(b"h2");
                                    let svc = record(sni, client_cert, alpn);
                                    let io = hyper_util::rt::TokioIo::new(tls);
                                    if h2 {
                                        let _ = hyper::server::conn::http2::Builder::new(
                                            hyper_util::rt::TokioExecutor::new(),
                                        )
                                        .serve_connection(io, svc)
                                        .await;
                                    } else {
                                        let _ = hyper::server::conn::http1::Builder::new()
                                            .serve_connection(io, svc)
                                            .await;
                                    }
                                }
                            }
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_background();
        });
        b
    }

    fn tls(pki: &Pki, alpn: &[&[u8]], require_client_cert: bool) -> TestBackend {
        let config = Arc::new(pki.server_config(alpn, require_client_cert));
        TestBackend::start(Mode::Tls { config }, Duration::ZERO)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A config repo routing everything to upstream `be`, with the CA and client certificate in
/// `certs/`, and the client key outside the repo (returned, to keep it alive).
fn tls_repo(
    pki: &Pki,
    targets: &str,
    upstream_extra: &str,
) -> (tempfile::TempDir, tempfile::TempDir) {
    let secrets = tempfile::tempdir().unwrap();
    let key_path = secrets.path().join("client.key");
    std::fs::write(&key_path, &pki.client_key).unwrap();
    let extra = upstream_extra.replace("$KEY", key_path.to_str().unwrap());
    let dir = repo(&[
        (
            "routes/all.toml",
            "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\n",
        ),
        (
            "upstreams/be.toml",
            &format!("[upstream.be]\ntargets = [{targets}]\n{extra}\n"),
        ),
        ("certs/ca.pem", &pki.ca),
        ("certs/client.pem", &pki.client_cert),
    ]);
    (dir, secrets)
}

fn start(dir: &tempfile::TempDir, workers: usize) -> Gateway {
    Gateway::start_dir(
        dir.path(),
        ServeOptions {
            workers,
            ..ServeOptions::default()
        },
    )
}

fn metric(gw: &Gateway, series: &str) -> f64 {
    scrape(gw).get(series).copied().unwrap_or(0.0)
}

#[test]
fn https_target_verified_with_the_configured_ca() {
    let pki = Pki::new();
    // The server would rather speak h2; an http1 upstream offers only http/1.1.
    let be = TestBackend::tls(&pki, &[b"h2", b"http/1.1"], false);
    let (dir, _s) = tls_repo(
        &pki,
        &format!("\"https://127.0.0.1:{}\"", be.addr.port()),
        "tls = { ca_file = \"certs/ca.pem\" }",
    );
    let gw = start(&dir, 1);
    for _ in 0..3 {
        assert_eq!(gw.get("/orders/7"), (200, "HTTP/1.1".to_owned()));
    }
    let seen = be.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.path == "/orders/7"));
    // An IP target: the certificate's IP SAN is checked and no SNI is sent.
    assert_eq!(seen[0].sni, None);
    assert_eq!(seen[0].alpn.as_deref(), Some(&b"http/1.1"[..]));
    // HTTP/1.1 over TLS is pooled like plain connections.
    assert_eq!(be.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn without_the_ca_the_system_roots_refuse_the_certificate() {
    let pki = Pki::new();
    let be = TestBackend::tls(&pki, &[], false);
    let (dir, _s) = tls_repo(
        &pki,
        &format!("\"https://localhost:{}\"", be.addr.port()),
        "",
    );
    let gw = GatewayProcess::start(
        &["--repo", dir.path().to_str().unwrap(), "--watch", "false"],
        &[],
    );
    let (status, body) = gw.get("/x").unwrap();
    assert_eq!(status, 502, "{body}");
    let port = be.addr.port().to_string();
    for secret in [
        port.as_str(),
        "localhost",
        "127.0.0.1",
        "certificate",
        "UnknownIssuer",
    ] {
        assert!(!body.contains(secret), "the body leaks `{secret}`: {body}");
    }
    assert!(be.seen().is_empty());
    assert!(be.handshake_failures.load(Ordering::SeqCst) >= 1);
    assert!(
        gw.metric("rustygate_upstream_errors_total{kind=\"tls\",upstream=\"be\"}")
            .is_some_and(|n| n >= 1.0)
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            let logs = gw.logs.lock().unwrap();
            logs.lines().any(|l| {
                l.contains("upstream request failed")
                    && l.contains("\"kind\":\"tls\"")
                    && l.contains("UnknownIssuer")
            })
        }),
        "the log says why: {}",
        gw.logs.lock().unwrap()
    );
}

#[test]
fn sni_is_the_configured_server_name() {
    let pki = Pki::new();
    let be = TestBackend::tls(&pki, &[], false);
    let (dir, _s) = tls_repo(
        &pki,
        &format!("\"https://127.0.0.1:{}\"", be.addr.port()),
        "tls = { ca_file = \"certs/ca.pem\", server_name = \"orders.internal\" }",
    );
    let gw = start(&dir, 1);
    assert_eq!(gw.get("/x").0, 200);
    assert_eq!(be.seen()[0].sni.as_deref(), Some("orders.internal"));

    // A target named by host sends that host when no server_name is set.
    let be2 = TestBackend::tls(&pki, &[], false);
    let (dir2, _s2) = tls_repo(
        &pki,
        &format!("\"https://localhost:{}\"", be2.addr.port()),
        "tls = { ca_file = \"certs/ca.pem\" }",
    );
    let gw2 = start(&dir2, 1);
    assert_eq!(gw2.get("/x").0, 200);
    assert_eq!(be2.seen()[0].sni.as_deref(), Some("localhost"));
}

#[test]
fn mutual_tls_presents_the_client_certificate_when_configured() {
    let pki = Pki::new();
    let be = TestBackend::tls(&pki, &[], true);
    let target = format!("\"https://127.0.0.1:{}\"", be.addr.port());
    let (dir, _s) = tls_repo(
        &pki,
        &target,
        "tls = { ca_file = \"certs/ca.pem\", client_cert_file = \"certs/client.pem\", client_key = { file = \"$KEY\" } }",
    );
    let gw = start(&dir, 1);
    assert_eq!(gw.get("/x").0, 200);
    assert!(be.seen()[0].client_cert);

    // The same backend refuses a gateway that has no client certificate.
    let (dir2, _s2) = tls_repo(&pki, &target, "tls = { ca_file = \"certs/ca.pem\" }");
    let gw2 = start(&dir2, 1);
    let (status, body) = gw2.get("/x");
    assert_eq!(status, 502, "{body}");
    assert_eq!(be.seen().len(), 1);
    assert!(be.handshake_failures.load(Ordering::SeqCst) >= 1);
}

#[test]
fn h2c_upstream_shares_one_connection_between_concurrent_requests() {
    let be = TestBackend::start(Mode::H2c, Duration::from_millis(200));
    let dir = repo(&as_refs(&proxy_to(
        &[format!("http://{}", be.addr)],
        "protocol = \"http2\"",
        "",
    )));
    let gw = start(&dir, 1);
    let addr = gw.addr.to_string();
    // Eight clients at once, on a cold pool: they wait for the one connection being opened.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || http(&addr, "GET", "/x", &[], b"").unwrap())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), (200, "HTTP/2.0".to_owned()));
    }
    assert_eq!(be.seen().len(), 8);
    assert!(be.seen().iter().all(|s| s.version == http::Version::HTTP_2));
    assert_eq!(be.connections.load(Ordering::SeqCst), 1);
    assert!(
        be.max_concurrent.load(Ordering::SeqCst) > 1,
        "requests were multiplexed"
    );
    // And it is kept for later requests.
    assert_eq!(gw.get("/y").0, 200);
    assert_eq!(be.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn h2_over_tls_is_negotiated_with_alpn_and_health_checked() {
    let pki = Pki::new();
    let be = TestBackend::tls(&pki, &[b"h2", b"http/1.1"], false);
    let (dir, _s) = tls_repo(
        &pki,
        &format!("\"https://127.0.0.1:{}\"", be.addr.port()),
        "protocol = \"http2\"\ntls = { ca_file = \"certs/ca.pem\", server_name = \"orders.internal\" }\n\
         health = { path = \"/healthz\", interval = \"100ms\", timeout = \"1s\" }",
    );
    let gw = start(&dir, 1);
    assert_eq!(gw.get("/x"), (200, "HTTP/2.0".to_owned()));
    assert!(
        wait_until(Duration::from_secs(5), || be
            .seen()
            .iter()
            .filter(|s| s.path == "/healthz")
            .count()
            >= 2),
        "health checks reach the h2 target"
    );
    let seen = be.seen();
    let req = seen.iter().find(|s| s.path == "/x").unwrap();
    assert_eq!(req.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(req.version, http::Version::HTTP_2);
    assert_eq!(req.sni.as_deref(), Some("orders.internal"));
    assert!(
        seen.iter()
            .filter(|s| s.path == "/healthz")
            .all(|s| s.version == http::Version::HTTP_2)
    );

    // A server that does not offer h2 by ALPN is refused clearly, not spoken HTTP/1.1 to.
    let h1_only = TestBackend::tls(&pki, &[], false);
    let (dir2, _s2) = tls_repo(
        &pki,
        &format!("\"https://127.0.0.1:{}\"", h1_only.addr.port()),
        "protocol = \"http2\"\ntls = { ca_file = \"certs/ca.pem\" }",
    );
    let gw2 = start(&dir2, 1);
    assert_eq!(gw2.get("/x").0, 502);
    assert!(h1_only.seen().is_empty());
    assert!(
        metric(
            &gw2,
            "rustygate_upstream_errors_total{kind=\"tls\",upstream=\"be\"}"
        ) >= 1.0
    );
}

#[test]
fn health_checks_use_tls_for_https_targets() {
    let pki = Pki::new();
    let be = TestBackend::tls(&pki, &[], false);
    let target = format!("https://127.0.0.1:{}", be.addr.port());
    let health = "health = { path = \"/healthz\", interval = \"100ms\", timeout = \"1s\", healthy_after = 1, unhealthy_after = 2 }";
    let (dir, _s) = tls_repo(
        &pki,
        &format!("\"{target}\""),
        &format!("tls = {{ ca_file = \"certs/ca.pem\" }}\n{health}"),
    );
    let gw = start(&dir, 1);
    assert!(
        wait_until(Duration::from_secs(5), || be
            .seen()
            .iter()
            .filter(|s| s.path == "/healthz")
            .count()
            >= 2),
        "health checks reach the https target"
    );
    let healthy = |gw: &Gateway| {
        let snap = gw.store.load();
        snap.upstreams[0].targets[0].state.is_healthy()
    };
    assert!(healthy(&gw));

    // With another CA the checks fail the handshake and the target goes unhealthy. (Target
    // state is kept per process by upstream, URL and check settings: stop the first gateway
    // and change the interval so the second starts afresh.)
    drop(gw);
    let other = Pki::new();
    let (dir2, _s2) = tls_repo(
        &other,
        &format!("\"{target}\""),
        &format!(
            "tls = {{ ca_file = \"certs/ca.pem\" }}\n{}",
            health.replace("100ms", "150ms")
        ),
    );
    let failures = be.handshake_failures.load(Ordering::SeqCst);
    let gw2 = start(&dir2, 1);
    assert!(
        wait_until(Duration::from_secs(5), || !healthy(&gw2)),
        "a target whose certificate does not verify is unhealthy"
    );
    assert!(be.handshake_failures.load(Ordering::SeqCst) > failures);
}

#[test]
fn a_closed_h2_connection_is_replaced() {
    let be = TestBackend::start(Mode::H2c, Duration::ZERO);
    let addr = be.addr;
    let dir = repo(&as_refs(&proxy_to(
        &[format!("http://{}", addr)],
        "protocol = \"http2\"",
        "",
    )));
    let gw = start(&dir, 1);
    assert_eq!(gw.get("/x").0, 200);
    // The backend goes away, closing the shared connection, and comes back on its port.
    drop(be);
    let back = TestBackend::start_at(addr, Mode::H2c, Duration::ZERO);
    assert!(
        wait_until(Duration::from_secs(5), || gw.get("/x").0 == 200),
        "a new connection is opened"
    );
    assert_eq!(back.connections.load(Ordering::SeqCst), 1);
    assert!(gw.get("/y").0 == 200 && back.connections.load(Ordering::SeqCst) == 1);
}

#[test]
fn trailers_of_an_h2_response_are_not_passed_to_an_http1_client() {
    let be = TestBackend::start(Mode::H2c, Duration::ZERO);
    let dir = repo(&as_refs(&proxy_to(
        &[format!("http://{}", be.addr)],
        "protocol = \"http2\"",
        "",
    )));
    let gw = start(&dir, 1);
    // The body arrives whole; the trailers (gRPC's status) do not: the client side is HTTP/1.1.
    let text = raw(
        gw.addr,
        b"GET /trailers HTTP/1.1\r\nHost: t\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("HTTP/2.0"), "{text}");
    assert!(!text.contains("grpc-status"), "{text}");
}
