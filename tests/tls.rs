//! TLS termination on `[[listener]]`s: certificates made with rcgen for each test, written to
//! a temp dir and named as `{ file = ... }` secrets, a blocking rustls client on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::server::ServeOptions;

/// A test CA that signs server and client certificates, written as PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate written to disk: its files and DER.
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "rustygate tls test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        Pki {
            dir,
            ca_pem,
            issuer: Issuer::new(ca, ca_key),
        }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names`, valid from yesterday for `days`, under `file` (+ `.key`).
    fn leaf(&self, file: &str, names: &[&str], days: i64, client: bool) -> Cert {
        self.leaf_with(
            file,
            names,
            time::OffsetDateTime::now_utc() - time::Duration::days(1),
            time::OffsetDateTime::now_utc() + time::Duration::days(days),
            client,
            &KeyPair::generate().unwrap(),
        )
    }

    fn leaf_with(
        &self,
        file: &str,
        names: &[&str],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
        client: bool,
        key: &KeyPair,
    ) -> Cert {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            if client { "client one" } else { names[0] },
        );
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let cert = p.signed_by(key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{file}.pem")),
            self.dir.path().join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        Cert {
            cert: c,
            key: k,
            der: cert.der().to_vec(),
        }
    }
}

/// `{ cert = { file = ... }, key = { file = ... } }`
fn cert_entry(c: &Cert) -> String {
    format!(
        "{{ cert = {{ file = \"{}\" }}, key = {{ file = \"{}\" }} }}",
        c.cert.display(),
        c.key.display()
    )
}

/// The `tls` keys of a listener that verifies client certificates from `pki`'s CA.
fn client_auth(pki: &Pki, required: bool) -> String {
    format!(
        ", client_auth = {{ ca = {{ file = \"{}\" }}, required = {required} }}",
        pki.ca_path().display()
    )
}

/// A gateway.toml with one TLS listener `https` on a free port and `extra` TOML after it.
fn gateway_toml(certs: &[&Cert], tls_extra: &str, extra: &str) -> String {
    let list = certs
        .iter()
        .map(|c| cert_entry(c))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[listener]]\nname = \"https\"\naddress = \"127.0.0.1:0\"\ntls = {{ certificates = [{list}]{tls_extra} }}\n{extra}"
    )
}

fn start(gateway: &str, be: &Backend) -> Gateway {
    let mut files = proxy_all(&be.url(), "");
    files.push(("gateway.toml", gateway.to_owned()));
    start_files(&files)
}

/// A one-worker gateway serving these files.
fn start_files(files: &[(&'static str, String)]) -> Gateway {
    let dir = repo(&as_refs(files));
    let opts = ServeOptions {
        workers: 1,
        ..ServeOptions::default()
    };
    let gw = Gateway::start_dir(dir.path(), opts);
    // The repo dir lives as long as the test process; leak it with the gateway's.
    std::mem::forget(dir);
    gw
}

fn client_config(
    pki: &Pki,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client: Option<&Cert>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some(c) => b
            .with_client_auth_cert(
                vec![CertificateDer::from(c.der.clone())],
                PrivateKeyDer::from_pem_file(&c.key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

fn default_client(pki: &Pki) -> Arc<ClientConfig> {
    client_config(pki, rustls::DEFAULT_VERSIONS, None)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake, sending `name` as SNI (an IP address sends none).
fn connect(addr: SocketAddr, name: &str, config: Arc<ClientConfig>) -> std::io::Result<Tls> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = ClientConnection::new(config, ServerName::try_from(name.to_owned()).unwrap())
        .map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The DER of the certificate the server presented.
fn presented(s: &Tls) -> Vec<u8> {
    s.conn.peer_certificates().unwrap()[0].to_vec()
}

/// One keep-alive request; status, lower-case headers and body. `None` when the connection
/// failed.
fn request(s: &mut Tls, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String)> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.flush().ok()?;
    let (head, body) = read_response(s)?;
    let status = head.get(9..12)?.parse().ok()?;
    Some((status, body))
}

/// The value of header `name` in an echo backend's JSON.
fn echoed(body: &str, name: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str() == Some(name))
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect()
}

/// The first series of `metric` whose labels contain every `labels` part.
fn metric(gw: &Gateway, metric: &str, labels: &[&str]) -> Option<f64> {
    scrape(gw)
        .into_iter()
        .find(|(k, _)| k.starts_with(metric) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
}

#[test]
fn sni_picks_the_certificate_by_its_names() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test", "127.0.0.1"], 90, false);
    let b = pki.leaf("b", &["*.b.test"], 90, false);
    let be = Backend::echo();
    let gw = start(&gateway_toml(&[&a, &b], "", ""), &be);
    let addr = gw.listener("https");

    let mut s = connect(addr, "a.test", default_client(&pki)).unwrap();
    assert_eq!(presented(&s), a.der);
    let (status, body) = request(&mut s, "/x", &[("X-Forwarded-Proto", "http")]).unwrap();
    assert_eq!(status, 200);
    // Over TLS the upstream learns it; a client's own claim is not believed.
    assert_eq!(echoed(&body, "x-forwarded-proto"), vec!["https"]);

    let s = connect(addr, "api.b.test", default_client(&pki)).unwrap();
    assert_eq!(presented(&s), b.der);
    // No SNI (an IP address): the first certificate.
    let s = connect(addr, "127.0.0.1", default_client(&pki)).unwrap();
    assert_eq!(presented(&s), a.der);
    // The wildcard covers one label only: `b.test` itself gets the default, which the client
    // refuses for that name.
    assert!(connect(addr, "b.test", default_client(&pki)).is_err());

    // The plain listener still says http.
    let (status, body) = http(&gw.addr.to_string(), "GET", "/", &[], b"").unwrap();
    assert_eq!(status, 200);
    assert_eq!(echoed(&body, "x-forwarded-proto"), vec!["http"]);

    assert_eq!(
        metric(
            &gw,
            "rustygate_tls_handshakes_total",
            &[
                "listener=\"https\"",
                "result=\"success\"",
                "version=\"TLSv1_3\""
            ]
        ),
        Some(3.0)
    );
    let expiry = metric(
        &gw,
        "rustygate_tls_certificate_expiry_timestamp_seconds",
        &["name=\"https/1\""],
    )
    .unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&b.der).unwrap();
    assert_eq!(expiry as i64, parsed.validity().not_after.timestamp());
}

#[test]
fn a_reload_changes_the_certificate_of_new_handshakes_only() {
    let pki = Pki::new();
    let old = pki.leaf("old", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(&gateway_toml(&[&old], "", ""), &be);
    let addr = gw.listener("https");
    let mut before = connect(addr, "a.test", default_client(&pki)).unwrap();
    assert_eq!(request(&mut before, "/1", &[]).unwrap().0, 200);

    let new = pki.leaf("new", &["a.test"], 90, false);
    gw.swap_resolved(&[("gateway.toml", &gateway_toml(&[&new], "", ""))]);

    let mut after = connect(addr, "a.test", default_client(&pki)).unwrap();
    assert_eq!(presented(&after), new.der);
    assert_eq!(request(&mut after, "/2", &[]).unwrap().0, 200);
    // The connection opened before the swap keeps its session and keeps serving.
    assert_eq!(presented(&before), old.der);
    assert_eq!(request(&mut before, "/3", &[]).unwrap().0, 200);
    assert_eq!(
        metric(
            &gw,
            "rustygate_tls_certificate_expiry_timestamp_seconds",
            &["name=\"https/0\""]
        )
        .map(|v| v as i64),
        Some(
            x509_parser::parse_x509_certificate(&new.der)
                .unwrap()
                .1
                .validity()
                .not_after
                .timestamp()
        )
    );
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_and_forwards_the_verified_subject() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let client = pki.leaf("client", &["client.test"], 90, true);
    let be = Backend::echo();
    let tls_extra = client_auth(&pki, true);
    let gw = start(&gateway_toml(&[&server], &tls_extra, ""), &be);
    let addr = gw.listener("https");

    // Without a certificate: the handshake (TLS 1.2) or the first request (TLS 1.3, where the
    // server's refusal arrives after the client's side is done) fails.
    let refused = connect(addr, "a.test", default_client(&pki))
        .ok()
        .and_then(|mut s| request(&mut s, "/", &[]));
    assert!(refused.is_none(), "{refused:?}");
    let tls12 = client_config(&pki, &[&rustls::version::TLS12], None);
    assert!(connect(addr, "a.test", tls12).is_err());
    // A certificate from another CA is refused too.
    let other_ca = Pki::new();
    let other = other_ca.leaf("other", &["client.test"], 90, true);
    let refused = connect(
        addr,
        "a.test",
        client_config(&pki, rustls::DEFAULT_VERSIONS, Some(&other)),
    )
    .ok()
    .and_then(|mut s| request(&mut s, "/", &[]));
    assert!(refused.is_none(), "{refused:?}");

    let mut s = connect(
        addr,
        "a.test",
        client_config(&pki, rustls::DEFAULT_VERSIONS, Some(&client)),
    )
    .unwrap();
    let (status, body) = request(
        &mut s,
        "/",
        &[
            ("X-Client-Cert-Subject", "CN=admin"),
            ("X-Client-Cert-Sha256", "00"),
        ],
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        echoed(&body, "x-client-cert-subject"),
        vec!["CN=client one"]
    );
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&client.der))
    };
    assert_eq!(echoed(&body, "x-client-cert-sha256"), vec![sha]);
    assert!(
        metric(
            &gw,
            "rustygate_tls_handshakes_total",
            &["listener=\"https\"", "result=\"failure\""]
        )
        .unwrap()
            >= 3.0
    );
}

#[test]
fn client_cert_headers_sent_by_clients_never_reach_the_upstream() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(
        &gateway_toml(&[&server], "", "[headers]\nallow_underscores = true\n"),
        &be,
    );
    let forged = [
        ("X-Client-Cert-Subject", "CN=admin"),
        ("x_client_cert_subject", "CN=admin"),
        ("X-Client-Cert-Sha256", "00"),
    ];
    // Over TLS without client_auth, and on the plain listener.
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    let (_, tls_body) = request(&mut s, "/", &forged).unwrap();
    let (_, plain_body) = http(&gw.addr.to_string(), "GET", "/", &forged, b"").unwrap();
    for body in [tls_body, plain_body] {
        for name in [
            "x-client-cert-subject",
            "x_client_cert_subject",
            "x-client-cert-sha256",
        ] {
            assert!(echoed(&body, name).is_empty(), "{name} in {body}");
        }
    }
}

/// Policies, rate-limit keys (and plugins and hash keys, which read headers the same way) see
/// the client-certificate headers only as the gateway sets them from a verified certificate:
/// a forged copy let any client pass a policy that checks the subject, and pick a new
/// rate-limit bucket with each request.
#[test]
fn policies_and_rate_limit_keys_see_only_the_verified_client_certificate() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let client = pki.leaf("client", &["client.test"], 90, true);
    let be = Backend::echo();
    let tls_extra = client_auth(&pki, true);
    let policy = r#"fn on_request(req) {
    if req.has_header("x-client-cert-subject") {
        req.set_header("x-policy-saw", req.header("x-client-cert-subject"));
    }
}
"#;
    let mut files = proxy_all(
        &be.url(),
        "policy = \"policies/see.rhai\"\nrate_limit = { requests = 2, per = \"1m\", key = \"header:x-client-cert-sha256\" }",
    );
    files.push((
        "gateway.toml",
        gateway_toml(
            &[&server],
            &tls_extra,
            "[headers]\nallow_underscores = true\n",
        ),
    ));
    files.push(("policies/see.rhai", policy.to_owned()));
    let gw = start_files(&files);

    let forged = |sha: &'static str| {
        [
            ("X-Client-Cert-Subject", "CN=admin"),
            ("x_client_cert_subject", "CN=admin"),
            ("X-Client-Cert-Sha256", sha),
        ]
    };
    // With a verified certificate, the policy sees its subject, not the client's copy.
    let mut s = connect(
        gw.listener("https"),
        "a.test",
        client_config(&pki, rustls::DEFAULT_VERSIONS, Some(&client)),
    )
    .unwrap();
    let (status, body) = request(&mut s, "/", &forged("01")).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(echoed(&body, "x-policy-saw"), vec!["CN=client one"]);

    // Without one (the plain listener), the policy sees none; and the forged fingerprints
    // all count by the client's address, as requests without the header do.
    let mut statuses = Vec::new();
    for sha in ["a1", "a2", "a3"] {
        let (status, body) = http(&gw.addr.to_string(), "GET", "/", &forged(sha), b"").unwrap();
        if status == 200 {
            assert!(echoed(&body, "x-policy-saw").is_empty(), "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

/// `require_client_cert = true` makes `client_auth` protect a route: without a verified
/// certificate it is 403 on every listener. Before, a route meant for mTLS clients was served
/// to anyone who sent its Host to the plain listener, or to a TLS listener without
/// `client_auth`. A route that requires one where no listener verifies any is an error.
#[test]
fn a_route_that_requires_a_client_certificate_refuses_requests_without_one() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let client = pki.leaf("client", &["client.test"], 90, true);
    let be = Backend::echo();
    let tls_extra = client_auth(&pki, false);
    let mut files = proxy_all(&be.url(), "require_client_cert = true");
    files.push(("gateway.toml", gateway_toml(&[&server], &tls_extra, "")));
    let gw = start_files(&files);
    let with_cert = client_config(&pki, rustls::DEFAULT_VERSIONS, Some(&client));
    let mut s = connect(gw.listener("https"), "a.test", with_cert).unwrap();
    let (status, body) = request(&mut s, "/", &[]).unwrap();
    assert_eq!(status, 200, "{body}");
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    let (status, body) = request(&mut s, "/", &[]).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("requires a verified client certificate"),
        "{body}"
    );
    let (status, _) = http(&gw.addr.to_string(), "GET", "/", &[], b"").unwrap();
    assert_eq!(status, 403);

    // No listener verifies client certificates: located error.
    let (ok, text) = diagnostics_of(
        "require_client_cert = true",
        &gateway_toml(&[&server], "", ""),
    );
    assert!(!ok, "{text}");
    assert!(text.contains("routes/all.toml:5:"), "{text}");
    assert!(text.contains("no listener verifies one"), "{text}");
}

#[test]
fn min_version_1_3_refuses_a_tls_1_2_client() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(
        &gateway_toml(&[&server], ", min_version = \"1.3\"", ""),
        &be,
    );
    let addr = gw.listener("https");
    let tls12 = client_config(&pki, &[&rustls::version::TLS12], None);
    assert!(connect(addr, "a.test", tls12).is_err());
    let mut s = connect(addr, "a.test", default_client(&pki)).unwrap();
    assert_eq!(request(&mut s, "/", &[]).unwrap().0, 200);

    // Without min_version, TLS 1.2 is served.
    let gw = start(&gateway_toml(&[&server], "", ""), &be);
    let tls12 = client_config(&pki, &[&rustls::version::TLS12], None);
    let mut s = connect(gw.listener("https"), "a.test", tls12).unwrap();
    assert_eq!(request(&mut s, "/", &[]).unwrap().0, 200);
    assert_eq!(
        metric(
            &gw,
            "rustygate_tls_handshakes_total",
            &["result=\"success\"", "version=\"TLSv1_2\""]
        ),
        Some(1.0)
    );
}

/// Reads until the server closes; `true` when it did (EOF or reset) before the read timeout.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_stalled_and_garbage_handshakes_are_closed_and_counted() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(
        &gateway_toml(&[&server], "", "[limits]\nheader_timeout = \"500ms\"\n"),
        &be,
    );
    let addr = gw.listener("https");

    // Connects and sends nothing.
    let mut silent = TcpStream::connect(addr).unwrap();
    // Sends the first bytes of a ClientHello, then stalls.
    let mut stalled = TcpStream::connect(addr).unwrap();
    let mut hello = Vec::new();
    {
        let mut conn = ClientConnection::new(
            default_client(&pki),
            ServerName::try_from("a.test").unwrap(),
        )
        .unwrap();
        conn.write_tls(&mut hello).unwrap();
    }
    stalled.write_all(&hello[..hello.len() / 2]).unwrap();
    // Speaks plain HTTP to the TLS port.
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();

    assert!(closed_by_server(&mut silent));
    assert!(closed_by_server(&mut stalled));
    assert!(closed_by_server(&mut garbage));
    // The listener still serves.
    let mut s = connect(addr, "a.test", default_client(&pki)).unwrap();
    assert_eq!(request(&mut s, "/", &[]).unwrap().0, 200);

    assert_eq!(
        metric(
            &gw,
            "rustygate_tls_handshakes_total",
            &["result=\"timeout\""]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &gw,
            "rustygate_tls_handshakes_total",
            &["result=\"failure\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            "rustygate_client_timeouts_total",
            &["phase=\"tls_handshake\""]
        ),
        Some(2.0)
    );
}

#[test]
fn a_slow_request_head_over_tls_gets_408() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(
        &gateway_toml(&[&server], "", "[limits]\nheader_timeout = \"500ms\"\n"),
        &be,
    );
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a").unwrap();
    s.flush().unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
}

/// A head the parser refuses gets the gateway's JSON `400` with its request id over TLS too,
/// and a head cut across TLS records with `Upgrade: h2c` is a plain request whose connection
/// stays open.
#[test]
fn refused_and_cut_heads_over_tls_are_answered_like_plain_ones() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(&gateway_toml(&[&server], "", ""), &be);
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    s.write_all(b"GET /a<b HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert!(text.contains("\r\nx-request-id: "), "{text:?}");
    assert!(
        text.contains(r#"{"error":"the request head is malformed""#),
        "{text:?}"
    );

    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    s.write_all(b"GET /h2c HTTP/1.1\r\nHost: a.test\r\nUpg")
        .unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b"rade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    let (head, _) = read_response(&mut s).unwrap();
    // Lower-cased by `read_response`.
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    assert!(!head.contains("connection:"), "{head:?}");
    assert_eq!(request(&mut s, "/after", &[]).map(|r| r.0), Some(200));
}

/// A client that completes its handshake and then sends nothing has `header_timeout` for its
/// first head, as on a plain connection: it was held for actix-http's 10 s.
#[test]
fn a_silent_connection_after_the_handshake_gets_the_header_timeout() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(
        &gateway_toml(&[&server], "", "[limits]\nheader_timeout = \"1s\"\n"),
        &be,
    );
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    s.sock
        .set_read_timeout(Some(std::time::Duration::from_secs(6)))
        .unwrap();
    let started = std::time::Instant::now();
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?} after {took:?}");
    assert!(
        took < std::time::Duration::from_secs(3),
        "closed after {took:?}"
    );
}

#[test]
fn redirect_to_https_answers_308_with_the_https_port() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(
        &gateway_toml(
            &[&server],
            "",
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\nredirect_to_https = true\n",
        ),
        &be,
    );
    let port = gw.listener("https").port();
    let answer = raw(
        gw.listener("http"),
        b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: shop.example:8080\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let location = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("location: ")
                .map(|_| l[10..].to_owned())
        })
        .unwrap();
    assert_eq!(
        location,
        format!("https://shop.example:{port}/a/b?x=1&y=%20")
    );
    // A Host that is not a plain name, or whose port the proxy listeners refuse, gets 400 with
    // the JSON error, never a redirect elsewhere.
    for host in ["evil.example/x", "a.test:99999", "a.test:x"] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(gw.listener("http"), request.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400"), "{host}: {answer}");
        assert!(answer.contains("not a valid host"), "{host}: {answer}");
    }
    // `--listen` is not a redirect listener.
    assert_eq!(gw.get("/").0, 200);
}

/// Compiles a repo with this gateway.toml, reading secrets, and returns its diagnostics as
/// `severity[code] file:line:col: message` lines.
fn diagnostics(gateway: &str) -> (bool, String) {
    diagnostics_of("", gateway)
}

/// [`diagnostics`], with `route_extra` on the catch-all route.
fn diagnostics_of(route_extra: &str, gateway: &str) -> (bool, String) {
    let be = "http://127.0.0.1:9";
    let mut files = proxy_all(be, route_extra);
    files.push(("gateway.toml", gateway.to_owned()));
    let dir = repo(&as_refs(&files));
    let c = compile_dir(
        dir.path(),
        &CompileOptions {
            resolve_secrets: true,
            secret_roots: vec![std::env::temp_dir()],
            ..CompileOptions::default()
        },
    )
    .unwrap();
    (c.snapshot.is_some(), c.diagnostics.render_short(&c.files))
}

#[test]
fn expired_not_yet_valid_and_mismatched_certificates_are_located_errors() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate().unwrap();
    let expired = pki.leaf_with(
        "expired",
        &["a.test"],
        now - time::Duration::days(30),
        now - time::Duration::days(1),
        false,
        &key,
    );
    let (ok, out) = diagnostics(&gateway_toml(&[&expired], "", ""));
    assert!(!ok);
    // The certificate entry is on line 4, its `cert` at column 34.
    assert!(
        out.contains("gateway.toml:4:34: error[expired-certificate]: the certificate expired on"),
        "{out}"
    );
    let future = pki.leaf_with(
        "future",
        &["a.test"],
        now + time::Duration::days(2),
        now + time::Duration::days(90),
        false,
        &key,
    );
    let (ok, out) = diagnostics(&gateway_toml(&[&future], "", ""));
    assert!(!ok);
    assert!(
        out.contains("gateway.toml:4:34: error[invalid-tls]: the certificate is not valid before"),
        "{out}"
    );

    let a = pki.leaf("a", &["a.test"], 90, false);
    let b = pki.leaf("b", &["b.test"], 90, false);
    let mismatched = Cert {
        cert: a.cert.clone(),
        key: b.key.clone(),
        der: a.der.clone(),
    };
    let (ok, out) = diagnostics(&gateway_toml(&[&mismatched], "", ""));
    assert!(!ok);
    assert!(
        out.contains("error[invalid-tls]: the key does not belong to the certificate"),
        "{out}"
    );

    std::fs::write(pki.dir.path().join("garbage.pem"), "not a certificate").unwrap();
    let garbage = Cert {
        cert: pki.dir.path().join("garbage.pem"),
        key: a.key.clone(),
        der: Vec::new(),
    };
    let (ok, out) = diagnostics(&gateway_toml(&[&garbage], "", ""));
    assert!(!ok);
    assert!(
        out.contains(
            "gateway.toml:4:34: error[invalid-tls]: the certificate holds no PEM certificate"
        ),
        "{out}"
    );

    // Cut short: the missing end line is named in words, not as a list of byte values.
    let whole = std::fs::read_to_string(&a.cert).unwrap();
    std::fs::write(pki.dir.path().join("cut.pem"), &whole[..whole.len() / 2]).unwrap();
    let cut = Cert {
        cert: pki.dir.path().join("cut.pem"),
        key: a.key.clone(),
        der: Vec::new(),
    };
    let (ok, out) = diagnostics(&gateway_toml(&[&cut], "", ""));
    assert!(!ok);
    assert!(
        out.contains(
            "the certificate is not valid PEM: a section has no `-----END CERTIFICATE-----` line"
        ),
        "{out}"
    );
}

#[test]
fn a_certificate_expiring_within_14_days_is_a_warning_with_its_date() {
    let pki = Pki::new();
    let soon = pki.leaf("soon", &["a.test"], 5, false);
    let (ok, out) = diagnostics(&gateway_toml(&[&soon], "", ""));
    assert!(ok, "{out}");
    let (_, parsed) = x509_parser::parse_x509_certificate(&soon.der).unwrap();
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(parsed.validity().not_after.timestamp() as u64),
    )
    .to_string();
    assert!(
        out.contains(&format!(
            "gateway.toml:4:34: warning[certificate-expires-soon]: the certificate expires on {date}"
        )),
        "{out}"
    );
    // 20 days: no warning.
    let later = pki.leaf("later", &["a.test"], 20, false);
    let (ok, out) = diagnostics(&gateway_toml(&[&later], "", ""));
    assert!(ok && out.is_empty(), "{out}");
}

#[test]
fn listener_config_errors_are_located() {
    let (ok, out) = diagnostics(
        "[[listener]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\nredirect_to_https = true\n",
    );
    assert!(!ok);
    assert!(
        out.contains("gateway.toml:4:21: error[invalid-listener]: `redirect_to_https` needs a listener with `tls`"),
        "{out}"
    );
    let (ok, out) = diagnostics(
        "[[listener]]\nname = \"web\"\naddress = \"localhost\"\n\n[[listener]]\nname = \"web\"\naddress = \"127.0.0.1:8080\"\n",
    );
    assert!(!ok);
    assert!(
        out.contains("gateway.toml:3:11: error[invalid-address]"),
        "{out}"
    );
    assert!(
        out.contains(
            "gateway.toml:6:8: error[duplicate-listener]: listener `web` is defined twice"
        ),
        "{out}"
    );
    let (ok, out) = diagnostics(
        "[[listener]]\nname = \"https\"\naddress = \"127.0.0.1:0\"\ntls = { certificates = [ { cert = \"-----BEGIN CERTIFICATE-----\", key = { file = \"/run/secrets/k\" } } ], min_version = \"1.1\", alpn = [\"spdy\"] }\n",
    );
    assert!(!ok);
    for want in [
        "error[inline-secret]: a certificate is not written in the repo",
        "error[invalid-tls]: `1.1` is not a TLS version",
        "error[invalid-tls]: `spdy` is not a protocol",
    ] {
        assert!(out.contains(want), "{want} not in {out}");
    }
}

#[test]
fn the_tls_example_compiles_with_real_certificates() {
    let pki = Pki::new();
    let cert = pki.leaf("api", &["api.example.com"], 90, false);
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tls");
    let dir = tempfile::tempdir().unwrap();
    for entry in walk(&example) {
        let rel = entry.strip_prefix(&example).unwrap();
        let text = std::fs::read_to_string(&entry).unwrap();
        let text = text
            .replace(
                "/etc/rustygate/tls/api.crt",
                &cert.cert.display().to_string(),
            )
            .replace(
                "/etc/rustygate/tls/api.key",
                &cert.key.display().to_string(),
            );
        write_files(dir.path(), &[(rel.to_str().unwrap(), &text)]);
    }
    let c = compile_dir(
        dir.path(),
        &CompileOptions {
            resolve_secrets: true,
            secret_roots: vec![std::env::temp_dir()],
            ..CompileOptions::default()
        },
    )
    .unwrap();
    assert!(
        c.diagnostics.is_empty(),
        "{}",
        c.diagnostics.render_short(&c.files)
    );
    let snap = c.snapshot.unwrap();
    assert!(snap.listeners.iter().any(|l| l.tls.is_some()));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_serves_http2_over_tls_with_the_connection_facts() {
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let client = pki.leaf("client", &["client.test"], 90, true);
    let be = Backend::echo();
    let tls_extra = client_auth(&pki, false);
    let gw = start(&gateway_toml(&[&server], &tls_extra, ""), &be);
    let mut config = (*client_config(&pki, rustls::DEFAULT_VERSIONS, Some(&client))).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.listener("https"))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get("https://a.test/h2")
        .header("x-client-cert-subject", "CN=admin")
        .body(full(""))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert_eq!(
        echoed(&body, "x-client-cert-subject"),
        vec!["CN=client one"]
    );
    assert_eq!(echoed(&body, "x-forwarded-proto"), vec!["https"]);

    // A client offering only http/1.1 gets HTTP/1.1; without a certificate (not required)
    // it passes with no client-cert headers.
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    assert_eq!(s.conn.alpn_protocol(), None);
    let (status, body) = request(&mut s, "/", &[("x-client-cert-subject", "CN=admin")]).unwrap();
    assert_eq!(status, 200);
    assert!(echoed(&body, "x-client-cert-subject").is_empty());
}

#[test]
fn a_certificate_renewed_in_place_is_served_after_the_next_poll() {
    let pki = Pki::new();
    let old = pki.leaf("api", &["a.test"], 90, false);
    let be = Backend::echo();
    let root = pki.dir.path().to_str().unwrap().to_owned();
    // The listener's port is in the config: written again with another one if it is taken.
    let (gw, port, _dir) = GatewayProcess::start_on_own_port(|port| {
        let gateway =
            gateway_toml(&[&old], "", "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        let mut files = proxy_all(&be.url(), "");
        files.push(("gateway.toml", gateway));
        let dir = repo(&as_refs(&files));
        let args = [
            "--repo",
            dir.path().to_str().unwrap(),
            "--secret-root",
            &root,
            "--poll",
            "200ms",
        ]
        .map(String::from)
        .to_vec();
        (args, dir)
    });
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut before = connect(addr, "a.test", default_client(&pki)).unwrap();
    assert_eq!(presented(&before), old.der);

    // Same paths, new certificate and key: no commit, no change in the config repo.
    let new = pki.leaf("api", &["a.test"], 60, false);
    assert!(
        wait_until(Duration::from_secs(20), || {
            connect(addr, "a.test", default_client(&pki)).is_ok_and(|s| presented(&s) == new.der)
        }),
        "{}",
        gw.logs.lock().unwrap()
    );
    assert_eq!(request(&mut before, "/", &[]).unwrap().0, 200);
}

/// One response from a kept-alive connection: its lower-case head and its body (by its
/// `Content-Length`). `None` when the connection ended first.
fn read_response(s: &mut Tls) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap_or(0));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((head, String::from_utf8_lossy(&body).into_owned()))
}

/// The listener follows request bodies in the bytes TLS has decrypted as it does on plain
/// HTTP: requests pipelined behind bodies wait for them (each gets its own response, and only
/// the last its `Connection: close`), and a malformed chunked body gets 400.
#[test]
fn bodies_are_followed_over_tls_for_pipelined_requests_and_malformed_chunks() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["a.test"], 90, false);
    let be = Backend::echo();
    let gw = start(&gateway_toml(&[&server], "", ""), &be);
    // Larger than a TLS record: the body comes in several reads.
    let body = "b".repeat(40_000);
    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    s.write_all(b"POST /one HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let rest = [
        format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
        "POST /two HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello".to_owned(),
        "GET /three HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".to_owned(),
    ]
    .concat();
    s.write_all(rest.as_bytes()).unwrap();
    s.flush().unwrap();
    let answers = [("/one", body.len()), ("/two", 5), ("/three", 0)];
    for (i, (uri, len)) in answers.iter().enumerate() {
        let (head, json) = read_response(&mut s).unwrap_or_else(|| panic!("no answer to {uri}"));
        assert!(head.starts_with("http/1.1 200"), "{uri}: {head}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["uri"], *uri, "answers in order");
        assert_eq!(v["body"].as_str().map(str::len), Some(*len), "{uri}");
        let closes = head.contains("\r\nconnection: close\r\n");
        assert_eq!(closes, i + 1 == answers.len(), "{uri}: {head}");
    }
    assert!(read_response(&mut s).is_none(), "closed after the last");

    let mut s = connect(gw.listener("https"), "a.test", default_client(&pki)).unwrap();
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    s.write_all(b"ZZ\r\n").unwrap();
    s.flush().unwrap();
    let (head, text) = read_response(&mut s).expect("an answer");
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(
        text.starts_with(r#"{"error":"the chunked body is malformed","request_id":""#),
        "{text:?}"
    );
}

/// An expired client CA fails every client certificate at the handshake: `validate` says so
/// (an error when every CA of the bundle expired, a warning when others still serve).
#[test]
fn an_expired_client_ca_is_located_by_validate() {
    let pki = Pki::new();
    let a = pki.leaf("a", &["a.test"], 90, false);
    let mut old = CertificateParams::new(Vec::<String>::new()).unwrap();
    old.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    old.distinguished_name
        .push(DnType::CommonName, "an expired test CA");
    old.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(60);
    old.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let old_pem = old
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let expired = pki.dir.path().join("expired-ca.pem");
    std::fs::write(&expired, &old_pem).unwrap();
    let bundle = pki.dir.path().join("bundle-ca.pem");
    std::fs::write(&bundle, format!("{}{old_pem}", pki.ca_pem)).unwrap();
    let with_ca = |ca: &std::path::Path| {
        gateway_toml(
            &[&a],
            &format!(
                ", client_auth = {{ ca = {{ file = \"{}\" }}, required = true }}",
                ca.display()
            ),
            "",
        )
    };
    let (ok, out) = diagnostics(&with_ca(&expired));
    assert!(!ok, "{out}");
    assert!(
        out.contains("error[expired-certificate]: the client CA expired on"),
        "{out}"
    );
    let (ok, out) = diagnostics(&with_ca(&bundle));
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "warning[expired-certificate]: a certificate of the client CA bundle expired on"
        ),
        "{out}"
    );
}
