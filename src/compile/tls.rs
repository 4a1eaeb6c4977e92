//! An upstream's `protocol` and `tls = { ... }` → the rustls `ClientConfig` its `https://`
//! targets share, built once per compile so that `validate` catches every bad certificate.

use std::sync::Arc;

use http::uri::Scheme;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;

/// A PEM parse error in words: the crate's own text shows the marker it missed as a list of
/// byte values.
pub(crate) fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a section has no `-----END {}-----` line (the file is cut short?)",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Error::IllegalSectionStart { line } => format!(
            "a section starts with the malformed line `{}`",
            String::from_utf8_lossy(line).trim()
        ),
        other => other.to_string(),
    }
}
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};

use super::Cx;
use super::routes::resolve_secret;
use crate::config::files::FileKind;
use crate::config::raw::{RawTarget, RawUpstream, RawUpstreamTls, UpstreamProtocol, ValueSource};
use crate::config::{Diagnostic, FileId, Spanned};
use crate::upstream::PoolKey;
use crate::upstream::{Protocol, Target};
use crate::wire::tls::{TargetTls, client_config, system_roots};

/// An upstream's compiled TLS settings.
struct UpstreamTls {
    config: Arc<rustls::ClientConfig>,
    /// `server_name`, when set; else each target's host.
    server_name: Option<ServerName<'static>>,
    /// Identifies the settings (roots, client certificate, protocol) for connection pooling.
    fingerprint: [u8; 32],
}

/// Sets every target's protocol, TLS settings and pool key.
pub(crate) fn apply(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &Spanned<String>,
    u: &RawUpstream,
    targets: &mut [Target],
) {
    let protocol = match u.protocol {
        UpstreamProtocol::Http1 => Protocol::Http1,
        UpstreamProtocol::Http2 => Protocol::Http2,
    };
    let has_https = targets.iter().any(|t| t.scheme == Scheme::HTTPS);
    let tls = match (&u.tls, has_https) {
        (Some(t), false) => {
            cx.push(
                Diagnostic::warning(
                    "unused-tls",
                    format!(
                        "upstream `{}` has `tls` settings but no https:// target",
                        name.get()
                    ),
                )
                .at(file, t.span(), "ignored")
                .help("write the targets as \"https://host:port\" to connect with TLS"),
            );
            None
        }
        (_, false) => None,
        (t, true) => compile(cx, file, name, t.as_ref(), protocol),
    };
    for t in targets.iter_mut() {
        t.protocol = protocol;
        let mut key = Sha256::new();
        key.update(t.scheme.as_str());
        key.update([protocol as u8]);
        if t.scheme == Scheme::HTTPS
            && let Some(tls) = &tls
        {
            let server_name = match &tls.server_name {
                Some(n) => n.clone(),
                None => {
                    let host = t.authority.host();
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    match ServerName::try_from(host.to_owned()) {
                        Ok(n) => n,
                        Err(_) => {
                            let span = target_span(u, &t.url);
                            cx.push(
                                Diagnostic::error(
                                    "invalid-target",
                                    format!("`{host}` cannot be checked against a certificate"),
                                )
                                .at(file, span, "not a DNS name or IP address")
                                .help("set tls.server_name to the name in the certificate"),
                            );
                            continue;
                        }
                    }
                }
            };
            key.update(tls.fingerprint);
            key.update(server_name.to_str().as_bytes());
            t.tls = Some(TargetTls {
                config: Arc::clone(&tls.config),
                server_name,
            });
        }
        // Plain HTTP/1.1 keeps variant 0: the pool key is the authority alone, as before TLS.
        if t.tls.is_some() || protocol != Protocol::Http1 {
            let digest = key.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            let variant = u64::from_le_bytes(first).max(1);
            t.pool_key = PoolKey::new(t.pool_key.authority().clone(), variant);
        }
    }
}

fn target_span(u: &RawUpstream, url: &str) -> std::ops::Range<usize> {
    u.targets
        .iter()
        .find(|t| match t.get() {
            RawTarget::Url(s) => s == url,
            RawTarget::Weighted { url: s, .. } => s == url,
        })
        .map_or(u.targets.span(), |t| t.span())
}

/// An `invalid-tls` error at `span` (upstream and listener TLS settings alike).
pub(super) fn invalid(
    cx: &mut Cx<'_>,
    file: FileId,
    span: std::ops::Range<usize>,
    msg: String,
    label: &str,
) {
    cx.push(Diagnostic::error("invalid-tls", msg).at(file, span, label));
}

/// Builds the upstream's client config; `None` after reporting what is wrong.
fn compile(
    cx: &mut Cx<'_>,
    file: FileId,
    name: &Spanned<String>,
    raw: Option<&Spanned<RawUpstreamTls>>,
    protocol: Protocol,
) -> Option<UpstreamTls> {
    let errors = cx.diags.error_count();
    let t = raw.map(Spanned::get);
    let mut fingerprint = Sha256::new();

    let roots = match t.and_then(|t| t.ca_file.as_ref()) {
        Some(p) => {
            let pem = cx.read_repo_file(file, p, FileKind::Certificate, "CA", "certs/ca.pem");
            pem.and_then(|pem| {
                fingerprint.update(pem.as_bytes());
                cx.files.add(p.get().clone(), pem.clone());
                let certs = certificates(cx, file, p, &pem)?;
                let mut roots = RootCertStore::empty();
                for c in certs {
                    if let Err(e) = roots.add(c) {
                        invalid(
                            cx,
                            file,
                            p.span(),
                            format!(
                                "`{}` holds a certificate that is not a valid CA: {e}",
                                p.get()
                            ),
                            "invalid CA certificate",
                        );
                        return None;
                    }
                }
                Some(roots)
            })
        }
        None => {
            fingerprint.update(b"system roots");
            match system_roots() {
                Some(roots) => Some((*roots).clone()),
                None => {
                    let span = raw.map_or(name.span(), Spanned::span);
                    cx.push(
                        Diagnostic::warning(
                            "no-system-roots",
                            "no root certificates were found on this system: connections to the https:// targets will fail verification",
                        )
                        .at(file, span, "uses the system's root certificates")
                        .help("install the system CA certificates (ca-certificates), or set tls.ca_file"),
                    );
                    Some(RootCertStore::empty())
                }
            }
        }
    };

    let server_name = t.and_then(|t| t.server_name.as_ref()).and_then(|s| {
        // An IPv6 address may keep the brackets a target's host is written with.
        let name = s.get().as_str();
        let bare = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .filter(|n| n.parse::<std::net::Ipv6Addr>().is_ok())
            .unwrap_or(name);
        match ServerName::try_from(bare.to_owned()) {
            Ok(n) => Some(n),
            Err(_) => {
                invalid(
                    cx,
                    file,
                    s.span(),
                    format!("`{}` is not a DNS name or IP address", s.get()),
                    "invalid server name",
                );
                None
            }
        }
    });

    let client = match t.map(|t| (&t.client_cert_file, &t.client_key)) {
        None | Some((None, None)) => None,
        Some((Some(c), None)) => {
            cx.push(
                Diagnostic::error("invalid-tls", "`client_cert_file` needs `client_key`")
                    .at(file, c.span(), "certificate without a key")
                    .help("add client_key = { file = \"/run/secrets/client.key\" }"),
            );
            None
        }
        Some((None, Some(k))) => {
            cx.push(
                Diagnostic::error("invalid-tls", "`client_key` needs `client_cert_file`").at(
                    file,
                    k.span(),
                    "key without a certificate",
                ),
            );
            None
        }
        Some((Some(c), Some(k))) => client_identity(cx, file, c, k, &mut fingerprint),
    };

    if cx.diags.error_count() != errors {
        return None;
    }
    let roots = roots?;
    let key_span = t.and_then(|t| t.client_key.as_ref()).map(Spanned::span);
    match client_config(roots, client, protocol) {
        Ok(config) => Some(UpstreamTls {
            config: Arc::new(config),
            server_name,
            fingerprint: fingerprint.finalize().into(),
        }),
        Err(e) => {
            let span = key_span.unwrap_or(raw.map_or(name.span(), Spanned::span));
            invalid(
                cx,
                file,
                span,
                format!(
                    "the TLS settings of upstream `{}` are not usable: {e}",
                    name.get()
                ),
                "here",
            );
            None
        }
    }
}

/// Every certificate in a PEM text; `None` after reporting a bad or empty one.
fn certificates(
    cx: &mut Cx<'_>,
    file: FileId,
    p: &Spanned<String>,
    pem: &str,
) -> Option<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(c) if !c.is_empty() => Some(c),
        Ok(_) => {
            invalid(
                cx,
                file,
                p.span(),
                format!("`{}` holds no PEM certificate", p.get()),
                "no certificate",
            );
            None
        }
        Err(e) => {
            invalid(
                cx,
                file,
                p.span(),
                format!("`{}` is not valid PEM: {}", p.get(), pem_error(&e)),
                "invalid PEM",
            );
            None
        }
    }
}

/// The client certificate chain and key for mutual TLS. Without `resolve_secrets` the key is
/// not read, so the chain is checked and no identity is built.
fn client_identity(
    cx: &mut Cx<'_>,
    file: FileId,
    cert: &Spanned<String>,
    key: &Spanned<ValueSource>,
    fingerprint: &mut Sha256,
) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = cx
        .read_repo_file(
            file,
            cert,
            FileKind::Certificate,
            "client certificate",
            "certs/gateway.pem",
        )
        .and_then(|pem| {
            fingerprint.update(pem.as_bytes());
            cx.files.add(cert.get().clone(), pem.clone());
            certificates(cx, file, cert, &pem)
        });
    let ValueSource::Secret(secret) = key.get() else {
        cx.push(
            Diagnostic::error(
                "inline-secret",
                "a private key must not be written in the repo",
            )
            .at(file, key.span(), "inline key")
            .help("write client_key = { file = \"/run/secrets/client.key\" } or { env = \"CLIENT_KEY\" }"),
        );
        return None;
    };
    let text = resolve_secret(cx, file, key.span(), secret)?;
    if !cx.opts.resolve_secrets {
        return None;
    }
    fingerprint.update(Sha256::digest(text.as_bytes()));
    let key = match PrivateKeyDer::from_pem_slice(text.as_bytes()) {
        Ok(k) => k,
        Err(_) => {
            cx.push(
                Diagnostic::error(
                    "invalid-tls",
                    "`client_key` is not a PEM private key (PKCS#8, PKCS#1 or SEC1)",
                )
                .at(file, key.span(), "invalid key"),
            );
            return None;
        }
    };
    Some((chain?, key))
}
