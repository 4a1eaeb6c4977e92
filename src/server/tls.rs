//! TLS termination on the `[[listener]]`s with `tls`, and the 308 of `redirect_to_https`.
//!
//! The listener set is bound once, from the first snapshot. Each handshake reads the TLS
//! settings (certificates, `client_auth`, `min_version`, ALPN) of its listener from the
//! snapshot current at accept, so a reload changes the next handshake and never an open
//! connection. A listener the current config no longer has keeps the settings it last had.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{HttpMessage as _, Request, Response};
use actix_web::body::BoxBody;
use actix_web::{HttpResponse, web};
use http::HeaderValue;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::WorkerState;
use super::expect::{CONTINUED, Continued};
use super::listener::{ConnState, TlsInfo, conn_info};
use crate::proxy::headers::ClientCert;
use crate::snapshot::SnapshotStore;
use crate::telemetry::metrics::Metrics;

/// One bound TLS listener: its name and the settings it last had in a snapshot.
pub(crate) struct TlsListener {
    pub name: Arc<str>,
    last: Mutex<Arc<ServerConfig>>,
}

impl TlsListener {
    pub fn new(name: &str, config: Arc<ServerConfig>) -> Self {
        Self {
            name: name.into(),
            last: Mutex::new(config),
        }
    }

    /// The listener's settings in the current snapshot (or the last ones it had).
    fn config(&self, store: &SnapshotStore) -> Arc<ServerConfig> {
        let snap = store.load();
        let current = snap
            .listeners
            .iter()
            .find(|l| *l.name == *self.name)
            .and_then(|l| l.tls.as_ref()?.config.clone());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = current
            && !Arc::ptr_eq(&c, &last)
        {
            *last = c;
        }
        Arc::clone(&last)
    }

    /// Runs the server handshake within `timeout`, counting the result. `None` when it failed
    /// (the connection is closed by dropping it).
    pub async fn handshake(
        &self,
        io: TcpStream,
        store: &SnapshotStore,
        timeout: Duration,
        metrics: &Metrics,
    ) -> Option<(TlsStream<TcpStream>, TlsInfo)> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config(store));
        let count = |version: &str, result: &str| {
            metrics
                .tls_handshakes
                .with_label_values(&[&*self.name, version, result])
                .inc();
        };
        match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Ok(Ok(stream)) => {
                let (_, conn) = stream.get_ref();
                let version = match conn.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1_3",
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1_2",
                    _ => "other",
                };
                count(version, "success");
                let info = TlsInfo {
                    version,
                    sni: conn.server_name().map(str::to_owned),
                    h2: conn.alpn_protocol() == Some(b"h2"),
                    client_cert: conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| client_cert(c.as_ref())),
                };
                Some((stream, info))
            }
            Ok(Err(e)) => {
                count("none", "failure");
                tracing::debug!(listener = %self.name, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                count("none", "timeout");
                metrics
                    .client_timeouts
                    .with_label_values(&["tls_handshake"])
                    .inc();
                tracing::debug!(listener = %self.name, "TLS handshake not done within the header timeout; closing");
                None
            }
        }
    }
}

/// The verified client certificate as header values. A subject that cannot be read leaves the
/// headers out rather than send something the upstream could mistake for an identity.
fn client_cert(der: &[u8]) -> Option<ClientCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = HeaderValue::from_str(&subject_text(cert.subject())).ok()?;
    let sha256 = HeaderValue::from_str(&hex::encode(Sha256::digest(der))).ok()?;
    Some(ClientCert { subject, sha256 })
}

/// A subject DN as RFC 4514 text, in the certificate's order (`CN=client one, O=Example`):
/// `,` between RDNs, `+` inside one, each value escaped (§2.4), so that a CN of
/// `mallory, O=Admins` reads `CN=mallory\, O=Admins` and cannot pass for another DN. Control
/// characters are written as `\XX`, so every subject makes a header value. A value that is not
/// a string is `#` and its bytes in hex.
fn subject_text(name: &x509_parser::x509::X509Name<'_>) -> String {
    use x509_parser::der_parser::asn1_rs::Tag;
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in name.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(attr.attr_type(), registry) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            let value = attr.attr_value();
            let text = match value.tag() {
                Tag::BmpString => {
                    let units = value
                        .as_bytes()
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]));
                    char::decode_utf16(units)
                        .collect::<Result<String, _>>()
                        .ok()
                }
                Tag::NumericString
                | Tag::PrintableString
                | Tag::Utf8String
                | Tag::Ia5String
                | Tag::VisibleString
                | Tag::T61String
                | Tag::GeneralString
                | Tag::GraphicString => std::str::from_utf8(value.as_bytes())
                    .ok()
                    .map(str::to_owned),
                _ => None,
            };
            match text {
                Some(t) => escape_dn_value(&t, &mut out),
                None => {
                    out.push('#');
                    out.push_str(&hex::encode(value.as_bytes()));
                }
            }
        }
    }
    out
}

/// Appends `value` escaped as RFC 4514 §2.4 asks.
fn escape_dn_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_ascii_control() => out.push_str(&format!("\\{:02X}", c as u32)),
            c => out.push(c),
        }
    }
}

/// The proxy listeners' entry point: a `redirect_to_https` listener answers 308 to every
/// request, the others go to the proxy handler. actix-http's dispatchers call this for every
/// request (no actix-web `App`: no routing, extractors or request object of its own).
///
/// The handler's future is boxed here, where it is built, so that what the dispatcher boxes and
/// moves per request is a pointer rather than the whole exchange's state (kilobytes, copied
/// with every request).
pub(crate) fn entry(mut req: Request, state: web::Data<WorkerState>) -> Exchanging {
    // A request whose exchange began in the expect service (`Expect: 100-continue`): a method
    // check first, which costs the other requests nothing like an extensions lookup. A client
    // that sends this method itself has no exchange there and is served as any other.
    if req.method().as_str() == CONTINUED
        && let Some(Continued(exchange)) = req.extensions_mut().remove::<Continued>()
    {
        return Exchanging(exchange);
    }
    let payload = req.take_payload();
    Exchanging(entry_with(req, payload, state))
}

/// A request's exchange: the future of its answer.
pub(crate) type Exchange = Pin<Box<dyn Future<Output = HttpResponse>>>;

/// The exchange of a request whose body is `payload`: the 308 on a listener that redirects
/// to HTTPS, else the proxy's handler.
pub(crate) fn entry_with(
    req: Request,
    payload: actix_http::Payload,
    state: web::Data<WorkerState>,
) -> Exchange {
    // An HTTP/1.1 connection's state holds its facts: one lookup finds both.
    let conn_state = req.conn_data::<Rc<ConnState>>().cloned();
    let conn = match &conn_state {
        Some(c) => Some(Rc::clone(c.info())),
        None => conn_info(&req),
    };
    if let Some(port) = conn.as_ref().and_then(|c| c.redirect_to) {
        let resp = redirect(&req, port, &state);
        return Box::pin(std::future::ready(resp));
    }
    in_place(|| super::handler::handle(req, payload, state, conn, conn_state))
}

/// A request's way through the proxy, as the dispatchers take it: its response, never an
/// error (errors are responses).
pub(crate) struct Exchanging(Exchange);

impl Future for Exchanging {
    type Output = Result<Response<BoxBody>, actix_web::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx).map(|resp| Ok(resp.into()))
    }
}

/// `make()`'s future in a box allocated before it is built, so that the compiler can build it
/// there instead of on the stack and then copy its kilobytes over.
fn in_place<F: Future<Output = HttpResponse> + 'static>(make: impl FnOnce() -> F) -> Exchange {
    let slot = Box::<F>::new_uninit();
    let built: Box<F> = Box::write(slot, make());
    Box::into_pin(built)
}

/// `308` to `https://<host>[:port]<path?query>`; 400 when the request has no usable host.
fn redirect(req: &Request, port: u16, state: &WorkerState) -> HttpResponse {
    let started = std::time::Instant::now();
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .and_then(host_without_port);
    let status = match host {
        Some(host) => {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let location = if port == 443 {
                format!("https://{host}{pq}")
            } else {
                format!("https://{host}:{port}{pq}")
            };
            actix_web::http::header::HeaderValue::from_str(&location).map_err(|_| ())
        }
        None => Err(()),
    };
    let snapshot = state.store.load();
    let (code, resp) = match status {
        Ok(location) => (
            308,
            HttpResponse::PermanentRedirect()
                .insert_header(("location", location))
                .finish(),
        ),
        Err(()) => (
            400,
            HttpResponse::BadRequest().json(serde_json::json!({
                "error": "the Host header is not a valid host[:port]",
            })),
        ),
    };
    state.recorder.request(
        &snapshot,
        None,
        req.method().as_str(),
        code,
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// The host of a `Host` header without its port, if it is a plain name or address and the
/// header one the proxy listeners take (a port of at most 65535, digits only).
fn host_without_port(h: &str) -> Option<&str> {
    let host = super::handler::host_part(h.as_bytes())?;
    let host = &h[..host.len()];
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'[' | b']' | b':'));
    ok.then_some(host)
}

#[cfg(test)]
mod tests {
    use super::{client_cert, host_without_port};

    /// The subject header of a self-signed certificate with these subject attributes.
    fn subject_of(attrs: &[(rcgen::DnType, &str)]) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in attrs {
            params.distinguished_name.push(t.clone(), *v);
        }
        let cert = params.self_signed(&key).unwrap();
        let c = client_cert(cert.der()).expect("a header value");
        c.subject.to_str().unwrap().to_owned()
    }

    #[test]
    fn subjects_are_escaped_as_rfc_4514_asks() {
        use rcgen::DnType::{CommonName, OrganizationName};
        assert_eq!(
            subject_of(&[(CommonName, "client one"), (OrganizationName, "Example")]),
            "CN=client one, O=Example"
        );
        // A CN that would otherwise read as a second RDN.
        assert_eq!(
            subject_of(&[(CommonName, "mallory, O=Admins")]),
            "CN=mallory\\, O=Admins"
        );
        assert_ne!(
            subject_of(&[(CommonName, "mallory, O=Admins")]),
            subject_of(&[(CommonName, "mallory"), (OrganizationName, "Admins")])
        );
        assert_eq!(
            subject_of(&[(CommonName, " #a+b;c<d>e\"q\\ ")]),
            "CN=\\ #a\\+b\\;c\\<d\\>e\\\"q\\\\\\ "
        );
        assert_eq!(subject_of(&[(CommonName, "#x")]), "CN=\\#x");
        // A line feed no longer drops the headers: it is written as a hex pair.
        assert_eq!(subject_of(&[(CommonName, "a\nb")]), "CN=a\\0Ab");
    }

    #[test]
    fn redirect_host() {
        assert_eq!(host_without_port("a.example:8080"), Some("a.example"));
        assert_eq!(host_without_port("a.example"), Some("a.example"));
        assert_eq!(host_without_port("[::1]:80"), Some("[::1]"));
        assert_eq!(host_without_port("[::1]x"), None);
        assert_eq!(host_without_port("evil.example/x"), None);
        assert_eq!(host_without_port("a@b"), None);
        assert_eq!(host_without_port("a.test:99999"), None);
        assert_eq!(host_without_port("a.test:x"), None);
        assert_eq!(host_without_port("a.test:"), Some("a.test"));
        assert_eq!(host_without_port(""), None);
    }
}
