//! SIGTERM while `serve` loads its first config from a git host that accepts and never answers:
//! the load is abandoned (its fetch process killed) and the gateway exits at once, cleanly.
//! As PID 1 in the image, a signal without a handler did nothing: the stop waited for the whole
//! fetch timeout. A real process, a real signal, a real (silent) TCP server on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[test]
fn sigterm_during_the_first_load_stops_the_fetch_and_exits_cleanly() {
    // The git host: takes connections and says nothing.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/config.git", host.local_addr().unwrap());
    let (tx, accepted) = mpsc::channel::<TcpStream>();
    std::thread::spawn(move || {
        for s in host.incoming().take(4).flatten() {
            let _ = tx.send(s);
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let mut gw = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(["serve", "--repo", &url, "--poll", "0"])
        .args(["--fetch-timeout", "120s"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--cache-dir", cache.path().to_str().unwrap()])
        .args(["--log-format", "json"])
        .env_remove("RUSTYGATE_ADMIN_TOKEN")
        .env_remove("RUSTYGATE_WEBHOOK_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The fetch process is connected to the silent host.
    let mut fetching = accepted
        .recv_timeout(Duration::from_secs(30))
        .expect("the first load connects to the git host");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(gw.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = common::exit_within(&mut gw, Duration::from_secs(10))
        .expect("SIGTERM stops the start-up within 10 s");
    let mut logs = String::new();
    gw.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}\n{logs}");
    assert!(
        logs.contains("the first config load was abandoned"),
        "{logs}"
    );
    // The fetch process is gone: the host sees its connection closed.
    fetching
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match fetching.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    assert!(closed, "the fetch process still holds its connection");
}
