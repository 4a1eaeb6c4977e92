//! `rustygate status` against admin listeners that are not quite a gateway's: answers that are
//! JSON but not a RustyGate status, and HTTP that a minimal client gets wrong. Each fake
//! listener is a real socket on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::Duration;

/// An admin listener that answers each connection with `answer` once it has read the request
/// head; the request heads it got come out of the receiver.
fn fake_admin(answer: Vec<u8>) -> (String, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().take(8) {
            let mut s = s.unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = s.write_all(&answer);
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
        let (admin, _) = fake_admin(json_200(json));
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
    let (admin, _) = fake_admin(json_200(GOOD));
    let out = status(&["--admin", &admin]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("attempted  abc ok"));
}
