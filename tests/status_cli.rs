//! `rustygate status` against admin listeners that are not quite a gateway's: answers that are
//! JSON but not a RustyGate status, and HTTP that a minimal client gets wrong. Each fake
//! listener is a real socket on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

/// How a fake admin listener answers.
#[derive(Clone, Copy, PartialEq)]
enum Fake {
    /// Reads the request head, answers, closes.
    Plain,
    /// Answers and closes without reading the request (a redirecting front end).
    Early,
    /// Reads the request head, answers, and keeps the connection open.
    KeepOpen,
}

/// An admin listener that answers each connection with `answer` as `how` says; the request
/// heads it read come out of the receiver.
fn fake_admin(answer: Vec<u8>, how: Fake) -> (String, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for s in l.incoming().take(8) {
            let mut s = s.unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            if how == Fake::Early {
                let _ = s.write_all(&answer);
                continue;
            }
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(&answer);
            if how == Fake::KeepOpen {
                open.push(s);
            }
        }
    });
    (format!("http://{addr}"), rx)
}

/// A 200 whose body is `json`.
fn json_200(json: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{json}",
        json.len()
    )
    .into_bytes()
}

fn status(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .arg("status")
        .args(args)
        .env_remove("RUSTYGATE_ADMIN_URL")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD: &str = r#"{"version":"abc","loaded_at":"2026-12-01T10:00:00Z","attempted":{"sha":"abc","ok":true,"errors":[],"errors_total":0},"stale":false,"last_fetch_error":null}"#;

/// JSON that is not a gateway's status cannot be judged: exit 2 and which field is wrong.
/// Before, `{}` and `{"status":"UP"}` (a Spring Boot actuator on the port) were "in agreement",
/// exit 0, as was an `attempted` without `ok`.
#[test]
fn status_cannot_tell_from_json_that_is_not_a_gateways_status() {
    let cases: [(&str, &[&str], &str); 7] = [
        ("{}", &[], "`version` is missing"),
        (r#"{"status":"UP"}"#, &[], "`attempted` is missing"),
        ("[1]", &[], "the answer is a list, not an object"),
        (
            r#"{"version":5,"attempted":{"ok":"yes","errors":{"a":1}},"stale":"x","last_fetch_error":null}"#,
            &[],
            "`version` is a number, not a string",
        ),
        (
            r#"{"version":"abc","attempted":{"sha":"abc"},"stale":false,"last_fetch_error":null}"#,
            &[],
            "`attempted.ok` is missing",
        ),
        (GOOD, &["--fleet"], "`fleet` is missing"),
        (
            &GOOD.replace("null}", r#"null,"fleet":{"replicas":[]}}"#),
            &["--fleet"],
            "`fleet.agree` is missing",
        ),
    ];
    for (json, extra, says) in cases {
        let (admin, _) = fake_admin(json_200(json), Fake::Plain);
        let mut args = vec!["--admin", admin.as_str()];
        args.extend_from_slice(extra);
        let out = status(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{json}: {err}");
        assert!(
            err.contains("did not answer a RustyGate status"),
            "{json}: {err}"
        );
        assert!(err.contains(says), "{json}: {err}");
    }
    // A whole status is judged as before.
    let (admin, _) = fake_admin(json_200(GOOD), Fake::Plain);
    let out = status(&["--admin", &admin]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("attempted  abc ok"));
}

/// The client is a correct HTTP/1.1 client: a chunked answer is read (it was "did not answer
/// JSON"), a kept-open connection ends with its `Content-Length` (it waited for the close and
/// said "did not answer within 10 s"), an answer sent before the request was read is told as
/// such (it was "Broken pipe"), a base path is kept, and a wrong URL is named for what is wrong
/// with it (it was "invalid socket address" / "invalid port value").
#[test]
fn status_reads_http_as_a_client_should_and_names_what_went_wrong() {
    let chunked = format!(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\n{}\r\n{:x}\r\n{}\r\n0\r\nx-trailer: 1\r\n\r\n",
        &GOOD[..5],
        GOOD.len() - 5,
        &GOOD[5..]
    );
    let (admin, _) = fake_admin(chunked.into_bytes(), Fake::Plain);
    let out = status(&["--admin", &admin]);
    assert_eq!(out.status.code(), Some(0), "chunked: {}", text(&out.stderr));

    let (admin, _) = fake_admin(json_200(GOOD).to_vec(), Fake::KeepOpen);
    let out = status(&["--admin", &admin]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "kept open: {}",
        text(&out.stderr)
    );

    let redirect = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n";
    let (admin, _) = fake_admin(redirect.to_vec(), Fake::Early);
    let out = status(&["--admin", &admin]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("GET /status was answered 302 Found to http://127.0.0.1:1/"),
        "{err}"
    );

    let (admin, heads) = fake_admin(json_200(GOOD), Fake::Plain);
    let out = status(&["--admin", &format!("{admin}/gateway/"), "--fleet"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let head = heads.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        head.starts_with("GET /gateway/status?fleet=true HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nHost: {}\r\n", &admin[7..])),
        "{head}"
    );
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");

    for (url, says) in [
        ("http://127.0.0.1:99999", "`99999` is not a port number"),
        ("ftp://127.0.0.1:21", "the scheme is `ftp`, not http"),
        ("https://127.0.0.1:8081", "https is not spoken here"),
        ("127.0.0.1:8081", "no http:// in front"),
        ("http://user:pw@127.0.0.1:8081", "credentials in the URL"),
    ] {
        let out = status(&["--admin", url]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(
            err.contains(&format!("error: {url}: ")) && err.contains(says),
            "{url}: {err}"
        );
    }
    // No port is port 80, as in any URL (it was "invalid socket address").
    let err = text(&status(&["--admin", "http://127.0.0.1"]).stderr);
    assert!(!err.contains("invalid socket address"), "{err}");
}
