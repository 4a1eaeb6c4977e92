//! Git over HTTPS to a host whose certificate a private CA issued: refused with the system's
//! roots alone, served with `--git-ca-file`. The host is `git http-backend` (smart HTTP) behind
//! a small TLS server on loopback, with a CA and certificate made by rcgen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A private CA (PEM) and a server config with a `localhost` certificate it issued.
fn pki() -> (String, Arc<rustls::ServerConfig>) {
    let (ca_pem, cert, key) = localhost_pki("rustygate git test CA");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    (ca_pem, Arc::new(config))
}

/// Serves the repositories under `root` over HTTPS on a loopback port through
/// `git http-backend`, one request per connection.
fn https_git_server(root: PathBuf, config: Arc<rustls::ServerConfig>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (root, config) = (root.clone(), Arc::clone(&config));
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let _ = serve_one(&mut tls, &root);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

fn serve_one(tls: &mut impl ReadWrite, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(&mut *tls);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let (mut length, mut chunked, mut content_type) = (0usize, false, String::new());
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((h, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.trim().eq_ignore_ascii_case("chunked"),
            "content-type" => content_type = value.trim().to_owned(),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    }
    drop(reader);
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = std::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", &content_type)
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    cgi.stdin.take().unwrap().write_all(&body)?;
    let out = cgi.wait_with_output()?;
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .unwrap_or((out.stdout.len(), 0));
    let head = String::from_utf8_lossy(&out.stdout[..split.0]).into_owned();
    let payload = &out.stdout[(split.0 + split.1).min(out.stdout.len())..];
    let mut status = "200 OK".to_owned();
    let mut response = String::new();
    for h in head.lines().filter(|l| !l.is_empty()) {
        match h.split_once(':') {
            Some((n, v)) if n.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            _ => {
                response.push_str(h);
                response.push_str("\r\n");
            }
        }
    }
    write!(
        tls,
        "HTTP/1.1 {status}\r\n{response}Content-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    )?;
    tls.write_all(payload)?;
    tls.flush()
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[test]
fn https_with_a_private_ca_needs_the_git_ca_file() {
    if std::process::Command::new("git")
        .args(["http-backend", "-h"])
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no git here");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(root.path().join("config.git")).unwrap();
    let route = "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200, body = \"over https\" }\n";
    commit_files(&repo, "main", &[("routes/main.toml", route)], "first");
    let (ca, config) = pki();
    let port = https_git_server(root.path().to_path_buf(), config);
    let url = format!("https://localhost:{port}/config.git");
    let keys = tempfile::tempdir().unwrap();
    let ca_file = keys.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();

    // The system's roots do not know the private CA: the first fetch fails, nothing is cached,
    // the gateway does not start.
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args([
            "serve",
            "--repo",
            &url,
            "--poll",
            "0",
            "--reload-timeout",
            "30s",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    // With the CA file, the same host is trusted.
    let gw = GatewayProcess::start(
        &[
            "--repo",
            &url,
            "--cache-dir",
            cache.path().to_str().unwrap(),
            "--poll",
            "0",
            "--git-ca-file",
            ca_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(wait_until(Duration::from_secs(10), || gw
        .get("/")
        .is_some_and(|(_, b)| b == "over https")));
}

/// A TLS server on loopback answering each request with `respond(request line)`, after
/// recording the request's `Authorization` header (`None` when absent).
fn recording_server(
    config: Arc<rustls::ServerConfig>,
    respond: impl Fn(&str) -> String + Send + Sync + 'static,
) -> (u16, Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (record, respond) = (Arc::clone(&seen), Arc::new(respond));
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, record, respond) = (
                Arc::clone(&config),
                Arc::clone(&record),
                Arc::clone(&respond),
            );
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut reader = BufReader::new(&mut tls);
                let mut first = String::new();
                let mut auth = None;
                if reader.read_line(&mut first).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    if let Some((n, v)) = h.split_once(':')
                        && n.eq_ignore_ascii_case("authorization")
                    {
                        auth = Some(v.trim().to_owned());
                    }
                }
                drop(reader);
                record.lock().unwrap().push(auth);
                let _ = tls.write_all(respond(&first).as_bytes());
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, seen)
}

/// `RUSTYGATE_GIT_TOKEN` is for the configured git host: a host that asks for credentials
/// gets it, but when the configured host redirects the fetch to another one (here another
/// port), that one does not, even when it asks.
#[test]
fn the_git_token_is_not_sent_to_the_host_a_redirect_names() {
    let (ca, config) = pki();
    let keys = tempfile::tempdir().unwrap();
    let ca_file = keys.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let (asks, asked) = recording_server(Arc::clone(&config), |_| {
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned()
    });
    let (moves, _) = recording_server(config, move |line| {
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        format!(
            "HTTP/1.1 302 Found\r\nLocation: https://localhost:{asks}{target}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    });
    let fetch = |port: u16| {
        let cache = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .args([
                "serve",
                "--repo",
                &format!("https://localhost:{port}/cfg.git"),
            ])
            .args(["--poll", "0", "--fetch-timeout", "10s"])
            .arg("--git-ca-file")
            .arg(&ca_file)
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("RUSTYGATE_GIT_TOKEN", "tok-SECRET")
            .output()
            .unwrap();
        assert!(!out.status.success());
    };
    use base64::Engine;
    let sent = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("x-access-token:tok-SECRET")
    );

    // Configured host asks: it gets the token.
    fetch(asks);
    assert!(
        asked.lock().unwrap().contains(&Some(sent.clone())),
        "{:?}",
        asked.lock().unwrap()
    );

    // The configured host redirects to the one that asks: that one is reached, without it.
    asked.lock().unwrap().clear();
    fetch(moves);
    let seen = asked.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the redirect was not followed");
    assert!(seen.iter().all(Option::is_none), "{seen:?}");
}
