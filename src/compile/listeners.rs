//! `[[listener]]` of gateway.toml → [`ListenerSpec`]s, with each TLS listener's rustls
//! `ServerConfig` built here, so that `validate` catches every bad certificate.
//!
//! A certificate is refused when its PEM does not parse, its key does not match it, or it is
//! expired or not yet valid; one that expires within [`EXPIRY_WARNING`] is served with a
//! warning naming the date. The config's SNI resolver ([`SniResolver`]) picks a certificate by
//! the DNS names of its subjectAltName, wildcards included; the first certificate answers
//! clients that send no SNI or a name no certificate has.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use super::Cx;
use super::secrets::resolve_secret;
use super::tls::invalid;
use crate::config::raw::{
    GatewayFile, RawClientAuth, RawListener, RawListenerTls, RawServerCertificate, ValueSource,
};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::snapshot::{CertificateInfo, ListenerSpec, ListenerTls};
use crate::util::canonical_ip;

/// Certificates expiring sooner than this are served with a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Whether two listen addresses cannot both be bound: the same port (not 0) and the same
/// address, or a wildcard that takes the other's: `0.0.0.0` every IPv4 address, `[::]` every
/// IPv6 address and, dual-stack as `server::bind` makes it, every IPv4 address too (as nginx's
/// `listen [::]:80 ipv6only=off`; `0.0.0.0:80` beside it is refused by the kernel).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (x, y) = (canonical_ip(a.ip()), canonical_ip(b.ip()));
    let dual = |ip: IpAddr| ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let covers = |w: IpAddr, o: IpAddr| w.is_unspecified() && w.is_ipv4() == o.is_ipv4();
    x == y || dual(x) || dual(y) || covers(x, y) || covers(y, x)
}

/// The ALPN protocols a listener may offer.
const ALPN: [&str; 2] = ["h2", "http/1.1"];

pub(crate) fn compile_listeners(
    cx: &mut Cx<'_>,
    gateway: Option<&(FileId, GatewayFile)>,
) -> Vec<ListenerSpec> {
    let Some((file, g)) = gateway else {
        return Vec::new();
    };
    let file = *file;
    let mut out = Vec::new();
    let mut names: HashMap<&str, Range<usize>> = HashMap::new();
    let mut addresses: HashMap<SocketAddr, Range<usize>> = HashMap::new();
    let has_tls = g.listener.iter().any(|l| l.tls.is_some());
    for l in &g.listener {
        let raw: &RawListener = l.get();
        let name = raw.name.get().as_str();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            cx.push(
                Diagnostic::error("invalid-name", format!("`{name}` is not a listener name"))
                    .at(file, raw.name.span(), "letters, digits, `-`, `_`, `.`")
                    .help("name listeners e.g. \"https\" or \"public-http\""),
            );
        } else if let Some(first) = names.get(name) {
            cx.push(
                Diagnostic::error(
                    "duplicate-listener",
                    format!("listener `{name}` is defined twice"),
                )
                .at(file, raw.name.span(), "second definition")
                .also(file, first.clone(), "first definition"),
            );
        } else {
            names.insert(name, raw.name.span());
        }
        let address = match crate::util::parse_listen_addr(raw.address.get()) {
            Ok(a) => {
                if let Some((b, first)) = addresses.iter().find(|(b, _)| overlap(a, **b)) {
                    let d = if a == *b {
                        Diagnostic::error("duplicate-listener", format!("two listeners bind `{a}`"))
                    } else {
                        let wild = if a.ip().is_unspecified() { a } else { *b };
                        let every = if wild.is_ipv6() {
                            "every IPv6 and, being dual-stack, every IPv4 address"
                        } else {
                            "every IPv4 address"
                        };
                        Diagnostic::error(
                            "duplicate-listener",
                            format!(
                                "`{b}` and `{a}` cannot both listen: `{wild}` takes port {} on \
                                 {every}",
                                a.port()
                            ),
                        )
                        .help(format!(
                            "keep only `{wild}`, or give the listeners different ports"
                        ))
                    };
                    cx.push(d.at(file, raw.address.span(), "second listener").also(
                        file,
                        first.clone(),
                        "first listener",
                    ));
                }
                addresses.insert(a, raw.address.span());
                Some(a)
            }
            Err(help) => {
                cx.push(
                    Diagnostic::error(
                        "invalid-address",
                        format!("`{}` is not an address to listen on", raw.address.get()),
                    )
                    .at(file, raw.address.span(), "not ip:port")
                    .help(help),
                );
                None
            }
        };
        let redirect = raw.redirect_to_https.as_ref().is_some_and(|r| *r.get());
        if let Some(r) = raw.redirect_to_https.as_ref().filter(|r| *r.get()) {
            if raw.tls.is_some() {
                cx.push(
                    Diagnostic::error(
                        "invalid-listener",
                        "`redirect_to_https` is for plain HTTP listeners",
                    )
                    .at(file, r.span(), "this listener already has `tls`"),
                );
            } else if !has_tls {
                cx.push(
                    Diagnostic::error(
                        "invalid-listener",
                        "`redirect_to_https` needs a listener with `tls` to redirect to",
                    )
                    .at(file, r.span(), "no HTTPS listener")
                    .help("add a [[listener]] with tls = { certificates = [...] }"),
                );
            }
        }
        let http2 = raw.http2.as_ref().map_or(raw.tls.is_some(), |h| *h.get());
        let tls = raw
            .tls
            .as_ref()
            .and_then(|t| compile_tls(cx, file, name, t, http2));
        if let Some(address) = address
            && (raw.tls.is_none() || tls.is_some())
        {
            out.push(ListenerSpec {
                name: name.to_owned(),
                address,
                http2,
                redirect_to_https: redirect,
                tls,
            });
        }
    }
    out
}

/// The secret files a listener's TLS settings were read from, with the SHA-256 of their text.
type ReadFiles = Vec<(std::path::PathBuf, [u8; 32])>;

/// A secret's text; `None` after an error, or when secrets are not read. A file's path and
/// digest go to `read`.
fn secret(
    cx: &mut Cx<'_>,
    file: FileId,
    v: &Spanned<ValueSource>,
    what: &str,
    read: &mut ReadFiles,
) -> Option<String> {
    let ValueSource::Secret(s) = v.get() else {
        cx.push(
            Diagnostic::error(
                "inline-secret",
                format!("a {what} is not written in the repo"),
            )
            .at(file, v.span(), "inline value")
            .help("refer to it: { file = \"/run/secrets/api.pem\" } or { env = \"API_PEM\" }"),
        );
        return None;
    };
    let text = resolve_secret(cx, file, v.span(), s)?;
    if !cx.opts.resolve_secrets {
        return None;
    }
    if let crate::config::raw::SecretRef::File(path) = s {
        use sha2::Digest;
        read.push((path.into(), sha2::Sha256::digest(text.as_bytes()).into()));
    }
    Some(text)
}

fn compile_tls(
    cx: &mut Cx<'_>,
    file: FileId,
    listener: &str,
    raw: &Spanned<RawListenerTls>,
    http2: bool,
) -> Option<ListenerTls> {
    let errors = cx.diags.error_count();
    let t = raw.get();
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version.as_ref() {
        None => &[&rustls::version::TLS13, &rustls::version::TLS12],
        Some(v) => match v.get().trim() {
            "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
            "1.3" => &[&rustls::version::TLS13],
            other => {
                invalid(
                    cx,
                    file,
                    v.span(),
                    format!("`{other}` is not a TLS version this gateway serves"),
                    "\"1.2\" or \"1.3\"",
                );
                &[]
            }
        },
    };
    let alpn = alpn(cx, file, t, http2);
    if t.certificates.get().is_empty() {
        invalid(
            cx,
            file,
            t.certificates.span(),
            "a TLS listener needs at least one certificate".to_owned(),
            "empty",
        );
    }
    let mut keys = Vec::new();
    let mut infos = Vec::new();
    let mut read = ReadFiles::new();
    for (i, c) in t.certificates.get().iter().enumerate() {
        let name = format!("{listener}/{i}");
        if let Some((key, info)) = certificate(cx, file, c, name, &mut read) {
            keys.push((info.dns_names.clone(), Arc::new(key)));
            infos.push(info);
        }
    }
    let client_auth = t.client_auth.as_ref().map(|c| {
        (
            client_roots(cx, file, c, &mut read),
            c.required.as_ref().is_none_or(|r| *r.get()),
        )
    });
    if cx.diags.error_count() != errors {
        return None;
    }
    let mut out = ListenerTls {
        config: None,
        certificates: infos,
        client_auth: client_auth.is_some(),
        files: read,
    };
    if !cx.opts.resolve_secrets {
        return Some(out);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let built = (|| -> Result<rustls::ServerConfig, rustls::Error> {
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?;
        let builder = match client_auth {
            Some((roots, required)) => {
                let roots = roots.unwrap_or_else(RootCertStore::empty);
                let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                if !required {
                    v = v.allow_unauthenticated();
                }
                let v = v
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                builder.with_client_cert_verifier(v)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(SniResolver { certs: keys }));
        config.alpn_protocols = alpn;
        Ok(config)
    })();
    match built {
        Ok(c) => {
            out.config = Some(Arc::new(c));
            Some(out)
        }
        Err(e) => {
            invalid(
                cx,
                file,
                raw.span(),
                format!("the TLS settings of listener `{listener}` are not usable: {e}"),
                "here",
            );
            None
        }
    }
}

/// The ALPN list to offer: `alpn` as written, or `h2` (when HTTP/2 is on and this build serves
/// it) then `http/1.1`.
fn alpn(cx: &mut Cx<'_>, file: FileId, t: &RawListenerTls, http2: bool) -> Vec<Vec<u8>> {
    let Some(list) = &t.alpn else {
        let mut out = Vec::new();
        if http2 && crate::server::SERVES_H2 {
            out.push(b"h2".to_vec());
        }
        out.push(b"http/1.1".to_vec());
        return out;
    };
    let mut out = Vec::new();
    for p in list.get() {
        let v = p.get().as_str();
        if !ALPN.contains(&v) {
            invalid(
                cx,
                file,
                p.span(),
                format!("`{v}` is not a protocol this gateway serves"),
                "\"h2\" or \"http/1.1\"",
            );
        } else if v == "h2" && !(http2 && crate::server::SERVES_H2) {
            let why = if http2 {
                "this build does not serve HTTP/2"
            } else {
                "the listener has `http2 = false`"
            };
            invalid(
                cx,
                file,
                p.span(),
                format!("`h2` cannot be offered: {why}"),
                "h2",
            );
        } else {
            out.push(v.as_bytes().to_vec());
        }
    }
    if list.get().is_empty() {
        invalid(
            cx,
            file,
            list.span(),
            "`alpn` is empty".to_owned(),
            "offer \"http/1.1\" at least",
        );
    }
    out
}

/// One certificate and its key, checked; `None` after reporting what is wrong (or when secrets
/// are not read).
fn certificate(
    cx: &mut Cx<'_>,
    file: FileId,
    c: &Spanned<RawServerCertificate>,
    name: String,
    read: &mut ReadFiles,
) -> Option<(CertifiedKey, CertificateInfo)> {
    let c = c.get();
    let cert_text = secret(cx, file, &c.cert, "certificate", read);
    let key_text = secret(cx, file, &c.key, "private key", read);
    let (cert_text, key_text) = (cert_text?, key_text?);
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_slice_iter(cert_text.as_bytes()).collect::<Result<Vec<_>, _>>() {
            Ok(chain) if !chain.is_empty() => chain,
            Ok(_) => {
                invalid(
                    cx,
                    file,
                    c.cert.span(),
                    "the certificate holds no PEM certificate".into(),
                    "no certificate",
                );
                return None;
            }
            Err(e) => {
                invalid(
                    cx,
                    file,
                    c.cert.span(),
                    format!(
                        "the certificate is not valid PEM: {}",
                        super::tls::pem_error(&e)
                    ),
                    "invalid PEM",
                );
                return None;
            }
        };
    let key = match PrivateKeyDer::from_pem_slice(key_text.as_bytes()) {
        Ok(k) => k,
        Err(_) => {
            invalid(
                cx,
                file,
                c.key.span(),
                "the key is not a PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
                "invalid key",
            );
            return None;
        }
    };
    let signer = match rustls::crypto::ring::sign::any_supported_type(&key) {
        Ok(s) => s,
        Err(e) => {
            invalid(
                cx,
                file,
                c.key.span(),
                format!("the key cannot sign: {e}"),
                "unsupported key",
            );
            return None;
        }
    };
    let leaf = chain[0].clone();
    let certified = CertifiedKey::new(chain, signer);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        invalid(
            cx,
            file,
            c.key.span(),
            "the key does not belong to the certificate".into(),
            "key of another certificate",
        );
        return None;
    }
    let info = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, x)) => {
            let dns_names = x
                .subject_alternative_name()
                .ok()
                .flatten()
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            x509_parser::extensions::GeneralName::DNSName(d) => {
                                Some(d.to_ascii_lowercase())
                            }
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let validity = x.validity();
            (
                validity.not_before.timestamp(),
                validity.not_after.timestamp(),
                dns_names,
            )
        }
        Err(e) => {
            invalid(
                cx,
                file,
                c.cert.span(),
                format!("the certificate cannot be read: {e}"),
                "invalid certificate",
            );
            return None;
        }
    };
    let (not_before, not_after, dns_names) = info;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if not_after <= now {
        cx.push(
            Diagnostic::error(
                "expired-certificate",
                format!("the certificate expired on {}", date(not_after)),
            )
            .at(file, c.cert.span(), "expired")
            .help("renew it; an expired certificate is refused by every client"),
        );
        return None;
    }
    if not_before > now {
        cx.push(
            Diagnostic::error(
                "invalid-tls",
                format!("the certificate is not valid before {}", date(not_before)),
            )
            .at(file, c.cert.span(), "not yet valid")
            .help("check the clock of the machine that made it"),
        );
        return None;
    }
    if not_after - now < EXPIRY_WARNING.as_secs() as i64 {
        cx.push(
            Diagnostic::warning(
                "certificate-expires-soon",
                format!("the certificate expires on {}", date(not_after)),
            )
            .at(file, c.cert.span(), "expires within 14 days")
            .help("renew it before then"),
        );
    }
    Some((
        certified,
        CertificateInfo {
            name,
            not_after,
            dns_names,
        },
    ))
}

fn date(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn client_roots(
    cx: &mut Cx<'_>,
    file: FileId,
    c: &Spanned<RawClientAuth>,
    read: &mut ReadFiles,
) -> Option<RootCertStore> {
    let ca = &c.get().ca;
    let text = secret(cx, file, ca, "CA certificate", read)?;
    let mut roots = RootCertStore::empty();
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => {
            // An expired CA fails every client certificate it signed, at the handshake, with
            // nothing in the config to say why.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let expired: Vec<i64> = certs
                .iter()
                .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
                .map(|(_, x)| x.validity().not_after.timestamp())
                .filter(|&not_after| not_after <= now)
                .collect();
            if let Some(&first) = expired.first() {
                let all = expired.len() == certs.len();
                let d = if all {
                    Diagnostic::error(
                        "expired-certificate",
                        format!("the client CA expired on {}", date(first)),
                    )
                } else {
                    Diagnostic::warning(
                        "expired-certificate",
                        format!(
                            "a certificate of the client CA bundle expired on {}",
                            date(first)
                        ),
                    )
                };
                cx.push(
                    d.at(file, ca.span(), "expired")
                        .help("every client certificate it signed is refused at the handshake"),
                );
                if all {
                    return None;
                }
            }
            for cert in certs {
                if let Err(e) = roots.add(cert) {
                    invalid(
                        cx,
                        file,
                        ca.span(),
                        format!("the client CA is not a valid CA certificate: {e}"),
                        "invalid CA",
                    );
                    return None;
                }
            }
            Some(roots)
        }
        Ok(_) => {
            invalid(
                cx,
                file,
                ca.span(),
                "the client CA holds no PEM certificate".into(),
                "no certificate",
            );
            None
        }
        Err(e) => {
            invalid(
                cx,
                file,
                ca.span(),
                format!(
                    "the client CA is not valid PEM: {}",
                    super::tls::pem_error(&e)
                ),
                "invalid PEM",
            );
            None
        }
    }
}

/// Picks the certificate for a handshake by SNI: an exact DNS name first, then a wildcard
/// (`*.example.com` covers one label), else the listener's first certificate.
#[derive(Debug)]
pub(crate) struct SniResolver {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl SniResolver {
    /// The certificate for `sni`: an exact name, else a wildcard, else the first. Among the
    /// certificates of one kind of match (an RSA and an ECDSA one for the same names), the
    /// first whose key signs with a scheme the client offers (`schemes`; empty: any): a client
    /// that verifies only RSA signatures gets the RSA one, wherever it is listed.
    fn pick(
        &self,
        sni: Option<&str>,
        schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let signs = |k: &CertifiedKey| schemes.is_empty() || k.key.choose_scheme(schemes).is_some();
        let best = |matches: &dyn Fn(&[String]) -> bool| {
            let mut found = self.certs.iter().filter(|(names, _)| matches(names));
            let first = found.next()?;
            let usable = std::iter::once(first)
                .chain(found)
                .find(|(_, k)| signs(k))
                .unwrap_or(first);
            Some(Arc::clone(&usable.1))
        };
        if let Some(sni) = sni {
            let sni = sni.trim_end_matches('.').to_ascii_lowercase();
            if let Some(k) = best(&|names| names.contains(&sni)) {
                return Some(k);
            }
            if let Some((_, parent)) = sni.split_once('.') {
                let wild = |names: &[String]| {
                    names
                        .iter()
                        .any(|n| n.strip_prefix("*.").is_some_and(|p| p == parent))
                };
                if let Some(k) = best(&wild) {
                    return Some(k);
                }
            }
        }
        best(&|_| true)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name(), hello.signature_schemes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<CertifiedKey> {
        key_of(rcgen::KeyPair::generate().expect("key"))
    }

    fn key_of(k: rcgen::KeyPair) -> Arc<CertifiedKey> {
        let c = rcgen::CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&k)
            .expect("cert");
        let der = PrivateKeyDer::try_from(k.serialize_der()).expect("der");
        let signer = rustls::crypto::ring::sign::any_supported_type(&der).expect("signer");
        Arc::new(CertifiedKey::new(vec![c.der().clone()], signer))
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_first() {
        let (a, b, w) = (key(), key(), key());
        let r = SniResolver {
            certs: vec![
                (vec!["a.example".into()], Arc::clone(&a)),
                (vec!["b.example".into()], Arc::clone(&b)),
                (
                    vec!["*.wild.example".into(), "x.wild.example".into()],
                    Arc::clone(&w),
                ),
            ],
        };
        let same = |x: Option<Arc<CertifiedKey>>, y: &Arc<CertifiedKey>| {
            x.is_some_and(|x| Arc::ptr_eq(&x, y))
        };
        assert!(same(r.pick(Some("b.example"), &[]), &b));
        assert!(same(r.pick(Some("B.Example."), &[]), &b));
        assert!(same(r.pick(Some("q.wild.example"), &[]), &w));
        // A wildcard covers one label only.
        assert!(same(r.pick(Some("p.q.wild.example"), &[]), &a));
        assert!(same(r.pick(Some("wild.example"), &[]), &a));
        assert!(same(r.pick(None, &[]), &a));
        assert!(same(r.pick(Some("unknown.example"), &[]), &a));
    }

    /// Two certificates for one name with keys of different kinds: the client gets the one
    /// whose signatures it can verify, whichever is listed first. Before, only the first was
    /// ever served, and a client without that kind's schemes failed its handshake.
    #[test]
    fn of_two_certificates_for_one_name_the_client_gets_one_it_can_verify() {
        let ecdsa = key();
        let ed = key_of(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key"));
        let r = SniResolver {
            certs: vec![
                (vec!["a.example".into()], Arc::clone(&ecdsa)),
                (vec!["a.example".into()], Arc::clone(&ed)),
            ],
        };
        let same = |x: Option<Arc<CertifiedKey>>, y: &Arc<CertifiedKey>| {
            x.is_some_and(|x| Arc::ptr_eq(&x, y))
        };
        use rustls::SignatureScheme::{ECDSA_NISTP256_SHA256, ED25519};
        assert!(same(r.pick(Some("a.example"), &[ED25519]), &ed));
        assert!(same(
            r.pick(Some("a.example"), &[ECDSA_NISTP256_SHA256]),
            &ecdsa
        ));
        assert!(same(
            r.pick(Some("a.example"), &[ECDSA_NISTP256_SHA256, ED25519]),
            &ecdsa
        ));
        // No SNI: among all certificates, by the same rule.
        assert!(same(r.pick(None, &[ED25519]), &ed));
    }
}
