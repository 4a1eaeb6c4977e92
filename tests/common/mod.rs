//! Real things on loopback for the integration tests: HTTP backends on `127.0.0.1:0`, a gateway
//! started in-process from a config repo written to a temp dir, and small clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use rustygate::compile::{CompileOptions, compile_dir};
use rustygate::server::{Handles, ServeOptions};
use rustygate::snapshot::SnapshotStore;

pub mod redis_server;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An HTTP/1.1 backend on 127.0.0.1:0 running `handler` for every request.
pub struct Backend {
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    pub fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Backend::start_at("127.0.0.1:0".parse().unwrap(), handler)
    }

    /// A backend on a given address (to bring a stopped backend back on its port).
    pub fn start_at<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let std_listener = TcpListener::bind(addr).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = Arc::new(handler);
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        // The backend runs on its own thread and runtime, so tests of any flavour can use it.
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let handler = Arc::clone(&handler);
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| {
                                let fut = handler(req);
                                async move { Ok::<_, Infallible>(fut.await) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
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
        Backend {
            addr,
            connections,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Answers every request with a JSON echo of what it received.
    pub fn echo() -> Backend {
        Backend::echo_at("127.0.0.1:0".parse().unwrap())
    }

    /// [`Backend::echo`] on a given address (e.g. `[::1]:0`).
    pub fn echo_at(addr: SocketAddr) -> Backend {
        Backend::start_at(addr, |req: Request<Incoming>| async move {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let json = serde_json::json!({
                "method": method,
                "uri": uri,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json.to_string()))
                .unwrap()
        })
    }

    /// The value of header `name` in an [`Backend::echo`] answer (the first, if repeated).
    pub fn echoed_header(echo: &serde_json::Value, name: &str) -> Option<String> {
        echo["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap_or("").to_owned())
    }

    /// Answers every request with `status` and `body`.
    pub fn fixed(status: u16, body: &'static str) -> Backend {
        Backend::start(move |_req| async move {
            Response::builder().status(status).body(full(body)).unwrap()
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Returns once the listener is closed: a connection made after the drop is refused, never
/// accepted by a backend on its way out and then closed (a test that stops a target once saw a
/// request written to it that way, and a 502).
impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1:0 that runs `script` on each connection, after reading
/// its request head, each on a thread of its own.
pub fn scripted_upstream(script: fn(&mut TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                script(&mut s);
            });
        }
    });
    addr
}

/// A raw TCP backend that answers each connection with `response` bytes, verbatim.
pub fn raw_backend(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(response);
                let _ = s.flush();
                std::thread::sleep(Duration::from_millis(200));
            });
        }
    });
    addr
}

/// A port that nothing listens on (bound, then released).
pub fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Writes a config repo (`(relative path, content)` pairs) into a temp dir.
pub fn repo(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), files);
    dir
}

pub fn write_files(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
}

/// A gateway running in-process on 127.0.0.1:0, stopped on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The `[[listener]]`s by name, with their bound addresses.
    pub listeners: Vec<(String, SocketAddr)>,
    pub store: Arc<SnapshotStore>,
    pub dir: PathBuf,
    handles: Handles,
    thread: Option<std::thread::JoinHandle<()>>,
    _repo: Option<tempfile::TempDir>,
}

impl Gateway {
    /// Compiles `files` as a config repo and serves it.
    pub fn start(files: &[(&str, &str)]) -> Gateway {
        let dir = repo(files);
        let opts = ServeOptions {
            workers: 2,
            ..ServeOptions::default()
        };
        let mut g = Gateway::start_dir(dir.path(), opts);
        g._repo = Some(dir);
        g
    }

    pub fn start_dir(dir: &Path, opts: ServeOptions) -> Gateway {
        let compiled = compile_dir(
            dir,
            &CompileOptions {
                resolve_secrets: true,
                version_id: None,
                source: dir.display().to_string(),
                // Tests keep their secret files in temp dirs.
                secret_roots: vec![std::env::temp_dir()],
            },
        )
        .unwrap();
        let Some(snapshot) = compiled.snapshot else {
            panic!(
                "test config does not compile:\n{}",
                compiled.diagnostics.render_human(&compiled.files)
            );
        };
        Gateway::serve_store(dir, Arc::new(SnapshotStore::new(snapshot)), opts)
    }

    /// Serves the config repo `dir` (kept for the gateway's life) on one worker: tests that
    /// count what one worker's instances or pools did.
    pub fn start_one_worker(dir: tempfile::TempDir) -> Gateway {
        let mut gw = Gateway::start_dir(
            dir.path(),
            ServeOptions {
                workers: 1,
                ..ServeOptions::default()
            },
        );
        gw.keep_repo(dir);
        gw
    }

    /// Serves snapshots from `store` (filled by the caller, e.g. a `Reloader`); `dir` is the
    /// config repo it came from.
    pub fn serve_store(dir: &Path, store: Arc<SnapshotStore>, opts: ServeOptions) -> Gateway {
        let opts = ServeOptions {
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            ..opts
        };
        Gateway::serve_with(dir, store, opts, rustygate::server::Control::default())
    }

    /// Like [`Gateway::serve_store`], with the admin side's `control` (tokens, reload state,
    /// metrics) and the admin address of `opts` (the proxy listens on 127.0.0.1:0).
    pub fn serve_with(
        dir: &Path,
        store: Arc<SnapshotStore>,
        opts: ServeOptions,
        control: rustygate::server::Control,
    ) -> Gateway {
        let opts = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            access_log: false,
            ..opts
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_store = Arc::clone(&store);
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let running = rustygate::server::start(&opts, thread_store, control).unwrap();
                tx.send((
                    running.addr,
                    running.admin_addr,
                    running.listeners.clone(),
                    running.handles(),
                ))
                .unwrap();
                running.wait().await.unwrap();
            });
        });
        let (addr, admin_addr, listeners, handles) = rx.recv().unwrap();
        Gateway {
            addr,
            admin_addr,
            listeners,
            store,
            dir: dir.to_path_buf(),
            handles,
            thread: Some(thread),
            _repo: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Keeps the config repo's temp dir alive as long as the gateway.
    pub fn keep_repo(&mut self, dir: tempfile::TempDir) {
        self._repo = Some(dir);
    }

    /// `GET path` on a fresh connection: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http(&self.addr.to_string(), "GET", path, &[], b"").expect("gateway answered")
    }

    /// The bound address of the `[[listener]]` named `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener `{name}`"))
    }

    /// Writes `files` into the config dir, compiles it and publishes the result (a config swap).
    pub fn swap(&self, files: &[(&str, &str)]) {
        self.swap_with(files, &CompileOptions::default());
    }

    /// [`Gateway::swap`], reading secrets (from files under the temp dir) as `start` does.
    pub fn swap_resolved(&self, files: &[(&str, &str)]) {
        self.swap_with(
            files,
            &CompileOptions {
                resolve_secrets: true,
                secret_roots: vec![std::env::temp_dir()],
                ..CompileOptions::default()
            },
        );
    }

    fn swap_with(&self, files: &[(&str, &str)], opts: &CompileOptions) {
        write_files(&self.dir, files);
        let compiled = compile_dir(&self.dir, opts).unwrap();
        let Some(snapshot) = compiled.snapshot else {
            panic!(
                "swapped config does not compile:\n{}",
                compiled.diagnostics.render_human(&compiled.files)
            );
        };
        self.store.publish(snapshot);
    }
}

impl Gateway {
    /// Starts a graceful stop (the grace period of the gateway's options) from another thread,
    /// which ends when the gateway has stopped.
    pub fn stop_gracefully(&self) -> std::thread::JoinHandle<()> {
        let handles = self.handles.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(handles.stop(true));
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Stop from a plain thread: the test itself may be running inside a tokio runtime.
        let handles = self.handles.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(handles.stop(false));
        })
        .join();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A response read whole by [`send`].
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request on a fresh connection and reads the whole response.
pub async fn send(req: Request<Body>) -> Reply {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("gateway answered within 30 s")
        .expect("request succeeded");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn get(url: &str) -> Reply {
    send(Request::get(url).body(full("")).unwrap()).await
}

/// Writes raw bytes to the gateway and returns what it answered (until close or 2 s of quiet).
pub fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && response_complete(&out) {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn response_complete(out: &[u8]) -> bool {
    let text = String::from_utf8_lossy(out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok());
    len.is_some_and(|n| body.len() >= n)
}

/// Waits for `cond` to hold, polling, up to `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// How `child` ended, if it does within `limit`; otherwise it is killed (and reaped) and the
/// answer is `None`.
pub fn exit_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Routes everything to one upstream at `url`, with optional extra route keys.
pub fn proxy_all(url: &str, route_extra: &str) -> Vec<(&'static str, String)> {
    proxy_to(&[url.to_owned()], "", route_extra)
}

/// A config repo with one catch-all route `all` to upstream `be`: these targets, and extra
/// keys for the upstream and the route.
pub fn proxy_to(
    targets: &[String],
    upstream_extra: &str,
    route_extra: &str,
) -> Vec<(&'static str, String)> {
    let list = targets
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        (
            "routes/all.toml",
            format!(
                "[[route]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"be\"\n{route_extra}\n"
            ),
        ),
        (
            "upstreams/be.toml",
            format!("[upstream.be]\ntargets = [{list}]\n{upstream_extra}\n"),
        ),
    ]
}

/// The admin listener's `/metrics`, parsed into `series -> value`.
pub fn scrape(gw: &Gateway) -> std::collections::HashMap<String, f64> {
    let (status, body) = http(&gw.admin_addr.to_string(), "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// `promtool check metrics` on an exposition, where Prometheus' checker is installed.
pub fn promtool_check(text: &str) {
    let Ok(mut check) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        return;
    };
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(a, b)| (*a, b.as_str())).collect()
}

/// Runs `start` again (up to four more times) while the gateway exits on `Address already in
/// use`: its ports were free when picked, but another test may bind one first. Other exits
/// panic with the gateway's logs.
fn on_taken_port_again<R>(mut start: impl FnMut() -> Result<R, String>) -> R {
    let mut retries = 0;
    loop {
        match start() {
            Ok(r) => return r,
            Err(logs) if retries < 4 && logs.contains("Address already in use") => retries += 1,
            Err(logs) => panic!("{logs}"),
        }
    }
}

/// The real `rustygate serve` binary, on free loopback ports, killed on drop.
pub struct GatewayProcess {
    pub child: std::process::Child,
    pub listen: String,
    pub admin: String,
    /// Everything the gateway logged so far (stderr is drained continuously), or nothing
    /// when it was started with [`GatewayProcess::start_undrained`].
    pub logs: Arc<std::sync::Mutex<String>>,
    /// The stderr pipe, left unread, of a gateway started with
    /// [`GatewayProcess::start_undrained`].
    pub stderr: Option<std::process::ChildStderr>,
}

impl GatewayProcess {
    /// Starts `rustygate serve` with `args` (after `serve`) and `envs`, and waits for `/healthz`.
    /// The ports are free when picked, but another test may bind one before the gateway does:
    /// a gateway that exits on `Address already in use` is started again on new ports.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> GatewayProcess {
        Self::start_with(args, envs, true)
    }

    /// Like [`GatewayProcess::start`], but nobody reads the gateway's stderr: once the pipe's
    /// buffer is full its log writer blocks. The pipe is in [`GatewayProcess::stderr`].
    pub fn start_undrained(args: &[&str], envs: &[(&str, &str)]) -> GatewayProcess {
        Self::start_with(args, envs, false)
    }

    /// Like [`GatewayProcess::start`], for a config that names a port of its own: `setup`
    /// writes the config for a port and gives the arguments (and whatever must live as long as
    /// the gateway, such as the repo's directory). On `Address already in use` it is called
    /// again with another port.
    pub fn start_on_own_port<T>(
        mut setup: impl FnMut(u16) -> (Vec<String>, T),
    ) -> (GatewayProcess, u16, T) {
        on_taken_port_again(|| {
            let port = dead_port();
            let (args, keep) = setup(port);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Self::try_start(&args, &[], true).map(|gw| (gw, port, keep))
        })
    }

    fn start_with(args: &[&str], envs: &[(&str, &str)], drain: bool) -> GatewayProcess {
        on_taken_port_again(|| Self::try_start(args, envs, drain))
    }

    fn try_start(
        args: &[&str],
        envs: &[(&str, &str)],
        drain: bool,
    ) -> Result<GatewayProcess, String> {
        let listen = format!("127.0.0.1:{}", dead_port());
        let admin = format!("127.0.0.1:{}", dead_port());
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"));
        cmd.arg("serve")
            .args(args)
            .args([
                "--listen",
                &listen,
                "--admin-listen",
                &admin,
                "--workers",
                "1",
                "--log-format",
                "json",
            ])
            .env_remove("RUSTYGATE_ADMIN_TOKEN")
            .env_remove("RUSTYGATE_WEBHOOK_SECRET")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let logs = Arc::new(std::sync::Mutex::new(String::new()));
        let mut stderr = child.stderr.take();
        if drain {
            let mut stderr = stderr.take().unwrap();
            let sink = Arc::clone(&logs);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let up = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            http(&admin, "GET", "/healthz", &[], b"").is_some_and(|(s, _)| s == 200)
        });
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            if let Some(mut stderr) = stderr {
                let mut out = Vec::new();
                let _ = stderr.read_to_end(&mut out);
                logs.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&out));
            }
            return Err(format!(
                "rustygate exited with {status}:\n{}",
                logs.lock().unwrap()
            ));
        }
        assert!(up, "rustygate did not come up");
        Ok(GatewayProcess {
            child,
            listen,
            admin,
            logs,
            stderr,
        })
    }

    /// One replica per id of the repository at `url` (`--poll 0`, `--replica-id`), each with
    /// its own cache dir (kept alive by the returned dirs) and `envs`.
    pub fn replicas(
        url: &str,
        ids: &[&str],
        envs: &[(&str, &str)],
    ) -> (Vec<GatewayProcess>, Vec<tempfile::TempDir>) {
        let caches: Vec<tempfile::TempDir> =
            ids.iter().map(|_| tempfile::tempdir().unwrap()).collect();
        let gws = ids
            .iter()
            .zip(&caches)
            .map(|(id, cache)| {
                let dir = cache.path().to_str().unwrap();
                let args = [
                    "--repo",
                    url,
                    "--poll",
                    "0",
                    "--replica-id",
                    id,
                    "--cache-dir",
                    dir,
                ];
                GatewayProcess::start(&args, envs)
            })
            .collect();
        (gws, caches)
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http(&self.listen, "GET", path, &[], b"")
    }

    pub fn status(&self) -> serde_json::Value {
        let (_, body) = http(&self.admin, "GET", "/status", &[], b"").unwrap();
        serde_json::from_str(&body).unwrap()
    }

    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = http(&self.admin, "GET", "/metrics", &[], b"")?;
        body.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn admin_post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        http(&self.admin, "POST", path, headers, body).unwrap()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `rustygate` binary run with `args` to the end (outside a GitHub workflow's workspace).
pub fn rustygate(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(args)
        .env_remove("GITHUB_WORKSPACE")
        .output()
        .unwrap()
}

/// One HTTP/1.1 exchange on a fresh connection; `None` when the connection fails.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Commits `files` as the whole tree of `branch` (bare or not), returning the commit id.
pub fn commit_files(
    repo: &git2::Repository,
    branch: &str,
    files: &[(&str, &str)],
    message: &str,
) -> git2::Oid {
    fn build(repo: &git2::Repository, files: &[(String, String)]) -> git2::Oid {
        let mut tb = repo.treebuilder(None).unwrap();
        let mut dirs: std::collections::BTreeMap<String, Vec<(String, String)>> =
            Default::default();
        for (path, content) in files {
            match path.split_once('/') {
                Some((dir, rest)) => dirs
                    .entry(dir.to_owned())
                    .or_default()
                    .push((rest.to_owned(), content.clone())),
                None => {
                    let blob = repo.blob(content.as_bytes()).unwrap();
                    tb.insert(path, blob, 0o100644).unwrap();
                }
            }
        }
        for (dir, sub) in dirs {
            let oid = build(repo, &sub);
            tb.insert(&dir, oid, 0o040000).unwrap();
        }
        tb.write().unwrap()
    }
    let owned: Vec<(String, String)> = files
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let tree = repo.find_tree(build(repo, &owned)).unwrap();
    let sig = git2::Signature::now("Config Author", "author@example.com").unwrap();
    let refname = format!("refs/heads/{branch}");
    let parent = repo
        .find_reference(&refname)
        .ok()
        .and_then(|r| r.peel_to_commit().ok());
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    repo.commit(Some(&refname), &sig, &sig, message, &tree, &parents)
        .unwrap()
}

/// A keep-alive HTTP/1.1 client connection for load loops (no port churn).
pub struct KeepAlive {
    stream: std::io::BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn connect(addr: &str) -> Option<KeepAlive> {
        let s = TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        Some(KeepAlive {
            stream: std::io::BufReader::new(s),
        })
    }

    /// `GET path`; `None` on any I/O or framing error.
    pub fn get(&mut self, path: &str) -> Option<(u16, String)> {
        use std::io::BufRead;
        // One write: pieces written separately meet Nagle and delayed ACKs (40 ms a request).
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.stream.get_mut().write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        self.stream.read_line(&mut line).ok()?;
        let status: u16 = line.get(9..12)?.parse().ok()?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).ok()?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().ok()?;
            }
        }
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).ok()?;
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A private CA named `ca_name` and a `localhost` server certificate it issued, as PEM:
/// `(ca, certificate, key)`.
pub fn localhost_pki(ca_name: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
    (ca_pem, cert, key.serialize_pem())
}

/// VmRSS of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// An HTTP/2 frame: its 9-byte header (length, type, flags, stream) and `payload`.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The header block of an HTTP/2 request for `path` on `http://gateway.test`, each field a
/// literal without indexing, new name, no Huffman coding (RFC 7541 §6.2.2).
pub fn h2_request_block(method: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (n, v) in [
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "gateway.test"),
    ] {
        block.push(0);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    block
}

/// Sends a real SIGTERM to `child`.
pub fn sigterm(child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}
