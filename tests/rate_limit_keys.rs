//! Rate-limit keys are the bytes clients sent: header values that are not UTF-8 (obs-text)
//! get buckets of their own, in the in-process limiter and in the shared store, and UTF-8 keys
//! keep the form they always had in Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::redis_server::RedisServer;
use common::*;

/// The status of `GET /k` with `x-k: <value>` (raw bytes).
fn status_with_key(gw: &Gateway, value: &[u8]) -> u16 {
    let mut req = b"GET /k HTTP/1.1\r\nHost: t\r\nConnection: close\r\nx-k: ".to_vec();
    req.extend_from_slice(value);
    req.extend_from_slice(b"\r\n\r\n");
    let text = raw(gw.addr, &req);
    text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn keyed_gateway(store: &str, limit_store: &str) -> Gateway {
    Gateway::start(&[
        ("gateway.toml", store),
        (
            "routes/main.toml",
            &format!(
                "[[route]]\nname = \"k\"\npath = \"/k\"\nrespond = {{ status = 200, body = \"ok\" }}\n\
                 rate_limit = {{ requests = 1, per = \"1h\", key = \"header:x-k\"{limit_store} }}\n"
            ),
        ),
    ])
}

/// `a\xff`, `a\xfe` and `a\u{FFFD}` once read the same through a lossy UTF-8 conversion.
const LOOK_ALIKES: [&[u8]; 3] = [b"a\xff", b"a\xfe", "a\u{FFFD}".as_bytes()];

fn each_key_has_its_own_bucket(gw: &Gateway) {
    for k in LOOK_ALIKES {
        assert_eq!(status_with_key(gw, k), 200, "first request with {k:?}");
    }
    for k in LOOK_ALIKES {
        assert_eq!(status_with_key(gw, k), 429, "second request with {k:?}");
    }
}

#[test]
fn non_utf8_header_keys_get_their_own_local_buckets() {
    let gw = keyed_gateway("", "");
    each_key_has_its_own_bucket(&gw);
}

#[test]
fn non_utf8_header_keys_get_their_own_shared_buckets() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let gw = keyed_gateway(
        &format!(
            "[rate_limit_store]\nurl = \"{}\"\ntimeout = \"2s\"\non_store_error = \"allow\"\n",
            redis.url()
        ),
        ", store = \"redis\"",
    );
    each_key_has_its_own_bucket(&gw);
    assert_eq!(status_with_key(&gw, b"plain"), 200);
    let mut keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("rustygate:rl:k:*")
        .query(&mut redis.conn())
        .unwrap();
    keys.sort();
    let bucket = |k: &[u8]| [b"rustygate:rl:k:1-3600000-1:t:".as_slice(), k].concat();
    let mut want: Vec<Vec<u8>> = LOOK_ALIKES.iter().map(|k| bucket(k)).collect();
    want.push(bucket(b"plain"));
    want.sort();
    assert_eq!(keys, want, "one bucket per key, a UTF-8 key as before");
}
