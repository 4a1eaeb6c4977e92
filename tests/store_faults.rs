//! The shared store misbehaving on the network: a connection black-holed by the path to Redis,
//! and a Redis (or whoever sits between it and the gateway) that answers what it should not
//! (docs/scale-out.md, "Failure modes" and "Trust"). Real `redis-server`s, real `rustygate
//! serve` processes, and test-side TCP servers on loopback in front of them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A listener on 127.0.0.1:0 running `session` for each connection, on a runtime of its own
/// (kept alive by the caller).
fn serve<F, Fut>(session: F) -> (SocketAddr, tokio::runtime::Runtime)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(session(conn));
        }
    });
    (addr, rt)
}

/// A TCP proxy in front of `upstream` that can black-hole every connection open at one
/// moment: their bytes are dropped both ways and their sockets kept open, like a path whose
/// peer vanished without a reset. Connections opened later are forwarded.
struct BlackHoleProxy {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    _rt: tokio::runtime::Runtime,
}

impl BlackHoleProxy {
    fn start(upstream: u16) -> BlackHoleProxy {
        let open: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let list = Arc::clone(&open);
        let (addr, rt) = serve(move |client| {
            let list = Arc::clone(&list);
            async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                let hole = Arc::new(AtomicBool::new(false));
                list.lock().unwrap().push(Arc::clone(&hole));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, Arc::clone(&hole)));
                pump(sr, cw, hole).await;
            }
        });
        BlackHoleProxy {
            addr,
            open,
            _rt: rt,
        }
    }

    /// Black-holes the connections open now, for good.
    fn hole(&self) {
        for c in self.open.lock().unwrap().iter() {
            c.store(true, Ordering::SeqCst);
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }
}

/// Copies `from` to `to` until `from` ends (then ends `to`), dropping the bytes once `hole`
/// is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) if !hole.load(Ordering::SeqCst) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
        }
    }
    let _ = to.shutdown().await;
}

/// A config repo on `store_url`: `/` answers `body`, `/shared` is under a shared limit far
/// from reached, with `on_store_error = "deny"` (so 200 there means the store answered).
fn fleet_files(store_url: &str, body: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "gateway.toml",
            format!(
                "[rate_limit_store]\nurl = \"{store_url}\"\ntimeout = \"200ms\"\non_store_error = \"deny\"\n"
            ),
        ),
        (
            "routes/main.toml",
            format!(
                "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n\n\
                 [[route]]\nname = \"shared\"\npath = \"/shared\"\nrespond = {{ status = 200, body = \"ok\" }}\n\
                 rate_limit = {{ requests = 100000, per = \"1h\", key = \"route\", store = \"redis\" }}\n"
            ),
        ),
    ]
}

/// A bare repository whose `main` holds `files`, and one replica `a` of it (`--poll 0`).
struct OneReplica {
    gw: GatewayProcess,
    repo: git2::Repository,
    _dirs: (tempfile::TempDir, Vec<tempfile::TempDir>),
}

impl OneReplica {
    fn start(files: &[(&'static str, String)]) -> OneReplica {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init_bare(dir.path()).unwrap();
        let url = format!("file://{}", dir.path().display());
        commit_files(&repo, "main", &as_refs(files), "v1");
        let (mut gws, caches) = GatewayProcess::replicas(&url, &["a"], &[]);
        OneReplica {
            gw: gws.remove(0),
            repo,
            _dirs: (dir, caches),
        }
    }
}

fn status_of(gw: &GatewayProcess, path: &str) -> u16 {
    gw.get(path).map_or(0, |(s, _)| s)
}

/// The replicas the fleet view lists, or the error it shows.
fn fleet_names(gw: &GatewayProcess) -> Result<Vec<String>, String> {
    let (_, body) = http(&gw.admin, "GET", "/status?fleet=true", &[], b"").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let fleet = &v["fleet"];
    match fleet["replicas"].as_array() {
        Some(r) => Ok(r
            .iter()
            .map(|r| r["replica"].as_str().unwrap_or("").to_owned())
            .collect()),
        None => Err(fleet.to_string()),
    }
}

/// A connection the path black-holes is replaced: checks are answered by the store again
/// within seconds, the replica's fleet entry is written again, and the heads subscription is
/// made again (a head published afterwards is fetched, with polling off).
#[test]
fn a_black_holed_store_connection_is_replaced() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let proxy = BlackHoleProxy::start(redis.port);
    let one = OneReplica::start(&fleet_files(&proxy.url(), "v1"));
    let (gw, repo) = (&one.gw, &one.repo);
    assert!(
        wait_until(Duration::from_secs(10), || status_of(gw, "/shared") == 200),
        "the store never answered a check"
    );
    assert!(
        wait_until(Duration::from_secs(10), || fleet_names(gw)
            .is_ok_and(|n| n == ["a"])),
        "{:?}",
        fleet_names(gw)
    );

    proxy.hole();
    let holed = Instant::now();
    let hsets = redis.calls("hmset");
    // The first check on the black-holed connection times out: `deny`.
    assert!(
        wait_until(Duration::from_secs(10), || status_of(gw, "/shared") == 429),
        "the black hole was never seen"
    );
    let seen = Instant::now();
    let back = wait_until(Duration::from_secs(15), || {
        std::thread::sleep(Duration::from_millis(50));
        status_of(gw, "/shared") == 200
    });
    let took = seen.elapsed();
    eprintln!("checks answered by the store again {took:?} after the first timeout");
    assert!(back, "checks never answered by the store again");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The fleet entry: written at least every 5 s; one written on the black-holed connection
    // never reaches Redis.
    assert!(
        wait_until(Duration::from_secs(20), || redis.calls("hmset") > hsets),
        "the fleet entry was not written again {:?} after the black hole",
        holed.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(10), || fleet_names(gw)
            .is_ok_and(|n| n == ["a"])),
        "{:?}",
        fleet_names(gw)
    );

    // The heads subscription was black-holed too: a head announced now is still followed.
    let v2 = commit_files(
        repo,
        "main",
        &as_refs(&fleet_files(&proxy.url(), "v2")),
        "v2",
    )
    .to_string();
    let message = format!(r#"{{"replica":"elsewhere","sha":"{v2}"}}"#);
    let fetched = wait_until(Duration::from_secs(20), || {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("rustygate:heads")
            .arg(&message)
            .query(&mut redis.conn())
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        gw.get("/").is_some_and(|(_, b)| b == "v2")
    });
    assert!(
        fetched,
        "a head announced {:?} after the black hole was not followed",
        holed.elapsed()
    );
}

/// What a [`FakeRedis`] answers `EVALSHA` with.
#[derive(Clone, Copy, Debug)]
enum Huge {
    /// `$1000000000`, then bytes.
    Bulk,
    /// `*100000000`, then `:1` after `:1`.
    Array,
    /// Not huge, but without bounds: the first check on a connection "limited, retry after
    /// i64::MAX µs", every later one "allowed".
    Forever,
}

/// One huge answer a [`FakeRedis`] streamed: bytes written, and whether the gateway closed
/// the connection (a write failed) before the fake gave up.
#[derive(Debug, Clone, Copy)]
struct Streamed {
    bytes: usize,
    closed_by_gateway: bool,
}

/// Most a [`FakeRedis`] streams in one answer, and for how long at most.
const FAKE_LIMIT: usize = 256 << 20;
const FAKE_FOR: Duration = Duration::from_secs(30);

/// A hostile Redis: answers `+OK` to every command (the handshake, `SCRIPT LOAD`) except
/// `EVALSHA`, which it answers with a reply declaring itself huge and then streams, until the
/// gateway closes the connection or [`FAKE_LIMIT`] / [`FAKE_FOR`] (or as [`Huge::Forever`]
/// says).
struct FakeRedis {
    addr: SocketAddr,
    streamed: Arc<Mutex<Vec<Streamed>>>,
    _rt: tokio::runtime::Runtime,
}

impl FakeRedis {
    fn start(mode: Huge) -> FakeRedis {
        let streamed: Arc<Mutex<Vec<Streamed>>> = Arc::default();
        let log = Arc::clone(&streamed);
        let (addr, rt) = serve(move |conn| fake_session(conn, mode, Arc::clone(&log)));
        FakeRedis {
            addr,
            streamed,
            _rt: rt,
        }
    }

    /// A gateway with `routes` whose store is this fake (`timeout = "2s"`,
    /// `on_store_error = "deny"`).
    fn gateway(&self, routes: &str) -> Gateway {
        let store = format!(
            "[rate_limit_store]\nurl = \"redis://{}/\"\ntimeout = \"2s\"\non_store_error = \"deny\"\n",
            self.addr
        );
        Gateway::start(&[("gateway.toml", &store), ("routes/main.toml", routes)])
    }

    fn streamed(&self) -> Vec<Streamed> {
        self.streamed.lock().unwrap().clone()
    }
}

/// The first command in `buf` (a RESP array of bulk strings) and its length, if complete.
fn command(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(i64, usize)> {
        let end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let n = std::str::from_utf8(buf.get(at + 1..end)?)
            .ok()?
            .parse()
            .ok()?;
        Some((n, end + 2))
    }
    let (n, mut at) = line(buf, 0)?;
    let mut args = Vec::new();
    for _ in 0..n {
        let (len, start) = line(buf, at)?;
        let end = start + usize::try_from(len).ok()?;
        args.push(buf.get(start..end)?.to_vec());
        at = end + 2;
    }
    (buf.len() >= at).then_some((args, at))
}

async fn fake_session(mut conn: TcpStream, mode: Huge, log: Arc<Mutex<Vec<Streamed>>>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut checks = 0;
    loop {
        while let Some((args, used)) = command(&buf) {
            buf.drain(..used);
            let name = args.first().map(|a| a.to_ascii_uppercase());
            let answer: &[u8] = match (name.as_deref() == Some(b"EVALSHA".as_slice()), mode) {
                (false, _) => b"+OK\r\n",
                (true, Huge::Forever) if checks == 0 => {
                    b"*4\r\n:0\r\n:0\r\n:9223372036854775807\r\n:9223372036854775807\r\n"
                }
                (true, Huge::Forever) => b"*4\r\n:1\r\n:0\r\n:0\r\n:1000\r\n",
                (true, _) => b"",
            };
            if name.as_deref() == Some(b"EVALSHA".as_slice()) {
                checks += 1;
            }
            if !answer.is_empty() {
                if conn.write_all(answer).await.is_err() {
                    return;
                }
                continue;
            }
            let (head, body): (&[u8], Vec<u8>) = match mode {
                Huge::Bulk => (b"$1000000000\r\n", vec![b'A'; 64 * 1024]),
                _ => (b"*100000000\r\n", b":1\r\n".repeat(16 * 1024)),
            };
            let started = Instant::now();
            let mut sent = 0;
            let mut closed_by_gateway = conn.write_all(head).await.is_err();
            while !closed_by_gateway && sent < FAKE_LIMIT && started.elapsed() < FAKE_FOR {
                match conn.write_all(&body).await {
                    Ok(()) => sent += body.len(),
                    Err(_) => closed_by_gateway = true,
                }
            }
            log.lock().unwrap().push(Streamed {
                bytes: sent,
                closed_by_gateway,
            });
            return;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A store answering with a reply that declares itself huge (a bulk string of 1 GB, an array
/// of 100M integers) and streams it: the gateway drops the connection after what its cap
/// allows (the fake sees its socket closed long before it has streamed much), the check takes
/// `on_store_error`, and a route without a limit is answered meanwhile.
#[test]
fn a_huge_store_reply_drops_the_connection_at_the_cap() {
    for mode in [Huge::Bulk, Huge::Array] {
        let fake = FakeRedis::start(mode);
        let gw = fake.gateway(
                "[[route]]\nname = \"free\"\npath = \"/free\"\nrespond = { status = 200, body = \"ok\" }\n\n\
                 [[route]]\nname = \"shared\"\npath = \"/shared\"\nrespond = { status = 200, body = \"ok\" }\n\
                 rate_limit = { requests = 100, per = \"1h\", key = \"route\", store = \"redis\" }\n",
        );
        let addr = gw.addr;
        let free = std::thread::spawn(move || {
            (0..40)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(25));
                    let text = raw(
                        addr,
                        b"GET /free HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                    );
                    text.get(9..12).unwrap_or("").to_owned()
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(gw.get("/shared").0, 429, "{mode:?}: on_store_error = deny");
        let free = free.join().unwrap();
        assert!(free.iter().all(|s| s == "200"), "{mode:?}: {free:?}");
        assert!(
            wait_until(Duration::from_secs(40), || !fake.streamed().is_empty()),
            "{mode:?}: the fake never finished streaming"
        );
        let s = fake.streamed()[0];
        eprintln!("{mode:?}: {s:?}");
        assert!(s.closed_by_gateway, "{mode:?}: {s:?}");
        assert!(s.bytes < 32 << 20, "{mode:?}: the gateway read {s:?}");
    }
}

/// A store answering "limited, retry after i64::MAX µs" (292,000 years) is held to what the
/// limit can answer: `Retry-After` at most one emission interval (`per ÷ requests`), and the
/// key is asked about again once it is over, not remembered as over its limit for good.
#[test]
fn a_store_retry_after_is_held_to_what_the_limit_allows() {
    let fake = FakeRedis::start(Huge::Forever);
    let gw = fake.gateway(
            "[[route]]\nname = \"shared\"\npath = \"/shared\"\nrespond = { status = 200, body = \"ok\" }\n\
             rate_limit = { requests = 2, per = \"4s\", burst = 2, key = \"route\", store = \"redis\" }\n",
    );
    let head = raw(
        gw.addr,
        b"GET /shared HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    let retry_after: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Retry-After header");
    assert!(
        retry_after <= 2,
        "Retry-After: {retry_after} (interval 2 s)"
    );
    // The fake now allows: the key is asked about again once its (held) retry time is over.
    assert!(
        wait_until(Duration::from_secs(15), || gw.get("/shared").0 == 200),
        "the key stayed over its limit"
    );
}

/// Anyone who can publish on the heads channel can flood it: a replica logs the first
/// announcement, then at most one line per 10 s carrying how many it left out, instead of a
/// line per message.
#[test]
fn a_flood_on_the_heads_channel_logs_one_line_per_interval() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let one = OneReplica::start(&fleet_files(&redis.url(), "v1"));
    let lines = || {
        one.gw
            .logs
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains("another replica saw a new head") && l.contains("INFO"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut conn = redis.conn();
    let mut publish = |i: usize| -> i64 {
        let message = format!(r#"{{"replica":"elsewhere","sha":"{i:040x}"}}"#);
        redis::cmd("PUBLISH")
            .arg("rustygate:heads")
            .arg(message)
            .query(&mut conn)
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(10), || publish(0) == 1),
        "the replica never subscribed"
    );
    for i in 1..200 {
        publish(i);
    }
    assert!(wait_until(Duration::from_secs(5), || !lines().is_empty()));
    // The next line comes an interval after the first, with the count of those left out.
    assert!(
        wait_until(Duration::from_secs(20), || {
            publish(1000);
            std::thread::sleep(Duration::from_millis(500));
            lines().len() >= 2
        }),
        "{:?}",
        lines()
    );
    let lines = lines();
    assert!(lines.len() <= 3, "{} lines: {lines:?}", lines.len());
    assert!(
        lines[1].contains("\"heads_since_last_log\":")
            && !lines[1].contains("\"heads_since_last_log\":0"),
        "{lines:?}"
    );
}
