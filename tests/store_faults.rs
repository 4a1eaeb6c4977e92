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
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let open: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let list = Arc::clone(&open);
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let hole = Arc::new(AtomicBool::new(false));
                list.lock().unwrap().push(Arc::clone(&hole));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, Arc::clone(&hole)));
                tokio::spawn(pump(sr, cw, hole));
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
    let dir = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(dir.path()).unwrap();
    let url = format!("file://{}", dir.path().display());
    commit_files(
        &repo,
        "main",
        &as_refs(&fleet_files(&proxy.url(), "v1")),
        "v1",
    );
    let (gws, _caches) = GatewayProcess::replicas(&url, &["a"], &[]);
    let gw = &gws[0];
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
        &repo,
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
