//! Graceful shutdown of the real binary on a real SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let (arrived_tx, arrived_rx) = mpsc::channel::<()>();
    let arrived_tx = std::sync::Mutex::new(arrived_tx);
    let be = Backend::start(move |_req| {
        let _ = arrived_tx.lock().unwrap().send(());
        async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            http::Response::new(full("slow answer"))
        }
    });
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let mut gw = GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "10s",
        ],
        &[],
    );
    let listen = gw.listen.clone();

    // An idle keep-alive connection, open before the signal.
    let mut idle = TcpStream::connect(&listen).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    arrived_rx.recv_timeout(Duration::from_secs(5)).unwrap();

    let listen2 = listen.clone();
    let in_flight = std::thread::spawn(move || http_get(&listen2, "/slow"));
    arrived_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the slow request reached the backend");

    let status = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // New connections are refused while the in-flight request is still running.
    assert!(
        wait_until(Duration::from_secs(5), || TcpStream::connect(&listen)
            .is_err()),
        "the listener still accepts after SIGTERM"
    );
    let answer = in_flight.join().unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("slow answer"), "{answer}");

    // The idle keep-alive connection is closed at once rather than kept for the whole grace
    // period (10 s): a read that times out means it is still open.
    idle.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("idle keep-alive connection left open: {other:?}"),
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The drain thread may still be reading the last lines.
    wait_until(Duration::from_secs(5), || {
        gw.logs.lock().unwrap().contains("\"stopped\"")
    });
    let logs = gw.logs.lock().unwrap().clone();
    assert!(exit.success(), "exit status {exit}; logs:\n{logs}");
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(logs.contains("\"stopped\""), "{logs}");
}

/// A request still in progress when the shutdown grace ends is cut by the gateway, and its
/// access line says so (`503`, `shutdown`), as does a response cut mid-body (its status, error
/// `shutdown`); both were logged as the client's doing (`499`/`client_gone`).
#[test]
fn requests_cut_at_the_end_of_the_shutdown_grace_are_logged_as_shutdown() {
    let (arrived_tx, arrived_rx) = mpsc::channel::<()>();
    let arrived_tx = std::sync::Mutex::new(arrived_tx);
    let be = Backend::start(move |req| {
        let _ = arrived_tx.lock().unwrap().send(());
        let streamed = req.uri().path() == "/streamed";
        async move {
            if streamed {
                // A head and a first chunk, then nothing for longer than the grace.
                let (tx, rx) = tokio::sync::mpsc::channel::<
                    Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>,
                >(2);
                tokio::spawn(async move {
                    let first = hyper::body::Frame::data(bytes::Bytes::from_static(b"first"));
                    let _ = tx.send(Ok(first)).await;
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    drop(tx);
                });
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|f| (f, rx))
                });
                http::Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(stream),
                ))
            } else {
                tokio::time::sleep(Duration::from_secs(20)).await;
                http::Response::new(full("too late"))
            }
        }
    });
    let dir = repo(&as_refs(&proxy_all(&be.url(), "")));
    let mut gw = GatewayProcess::start(
        &[
            "--repo",
            dir.path().to_str().unwrap(),
            "--shutdown-grace",
            "1s",
        ],
        &[],
    );
    let listen = gw.listen.clone();
    let waiting = {
        let listen = listen.clone();
        std::thread::spawn(move || http_get(&listen, "/waiting"))
    };
    let streamed = {
        let listen = listen.clone();
        std::thread::spawn(move || http_get(&listen, "/streamed"))
    };
    for _ in 0..2 {
        arrived_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the requests reached the backend");
    }
    // The streamed response's head and first chunk reach the gateway.
    std::thread::sleep(Duration::from_millis(300));
    let status = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = waiting.join();
    let _ = streamed.join();
    wait_until(Duration::from_secs(5), || {
        gw.logs.lock().unwrap().contains("\"stopped\"")
    });
    let logs = gw.logs.lock().unwrap().clone();
    let line = |path: &str| {
        logs.lines()
            .find(|l| {
                l.contains("rustygate::access") && l.contains(&format!("\"path\":\"{path}\""))
            })
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .unwrap_or_else(|| panic!("no access line for {path}:\n{logs}"))
    };
    let w = line("/waiting");
    assert_eq!(
        (w["status"].as_u64(), w["error"].as_str()),
        (Some(503), Some("shutdown")),
        "{w}"
    );
    let s = line("/streamed");
    assert_eq!(
        (s["status"].as_u64(), s["error"].as_str()),
        (Some(200), Some("shutdown")),
        "{s}"
    );
    assert_eq!(s["completed"], false, "{s}");
}
