//! IPv6 end to end: upstream targets on `[::1]`, listeners on `[::1]` and dual-stack `[::]`,
//! and the client address the gateway believes and forwards for IPv6 and IPv4-mapped peers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::Request;

/// The gateway's own listener for `files`, plus a `[[listener]]` at `address`.
fn with_listener(files: &mut Vec<(&'static str, String)>, gateway_toml: &str, address: &str) {
    files.push((
        "gateway.toml",
        format!("{gateway_toml}\n[[listener]]\nname = \"extra\"\naddress = \"{address}\"\n"),
    ));
}

/// `[client_ip] trusted_proxies = [rule]`.
fn trusting(rule: &str) -> String {
    format!("[client_ip]\ntrusted_proxies = [\"{rule}\"]\n")
}

/// The `X-Forwarded-For` the echo backend behind `url` got for a request that sent `xff`.
async fn forwarded_for(url: &str, xff: &str) -> Option<String> {
    let echo = echo_of(url, &[("x-forwarded-for", xff)]).await;
    Backend::echoed_header(&echo, "x-forwarded-for")
}

/// A gateway proxying everything to `be`, with `gateway_toml` and a listener at `address`.
fn through_listener(be: &Backend, gateway_toml: &str, address: &str) -> Gateway {
    let mut files = proxy_all(&be.url(), "");
    with_listener(&mut files, gateway_toml, address);
    Gateway::start(&as_refs(&files))
}

async fn echo_of(url: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let reply = send(req.body(full("")).unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

/// A target written `http://[::1]:port` is connected to over IPv6, and the `Host` the upstream
/// gets (the target's, with `preserve_host = false`) keeps the brackets: `[::1]:port`, which is
/// what HTTP requires of an IPv6 literal (RFC 3986 §3.2.2), not `::1:port`.
#[tokio::test(flavor = "multi_thread")]
async fn an_ipv6_target_is_reached_and_sent_its_bracketed_host() {
    let be = Backend::echo_at("[::1]:0".parse().unwrap());
    assert!(be.url().starts_with("http://[::1]:"), "{}", be.url());
    let gw = Gateway::start(&as_refs(&proxy_all(&be.url(), "preserve_host = false")));
    let echo = echo_of(&gw.url("/x"), &[]).await;
    assert_eq!(
        Backend::echoed_header(&echo, "host"),
        Some(format!("[::1]:{}", be.addr.port()))
    );
}

/// A client on an IPv6 listener is forwarded as its IPv6 address; from a trusted IPv6 proxy
/// (`::1/128`) the client it names in `X-Forwarded-For` is believed and the proxy appended. On a
/// dual-stack `[::]` listener an IPv4 client's socket address is IPv4-mapped
/// (`::ffff:127.0.0.1`): a trusted-proxy rule written for `127.0.0.1` still matches it, and the
/// address forwarded is the plain IPv4 one.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_and_dual_stack_peers_are_trusted_and_forwarded_as_ip_addresses() {
    let be = Backend::echo();
    for (rules, listener, connect, want) in [
        // Untrusted: the client's own header is replaced by the peer.
        (String::new(), "[::1]:0", "[::1]", "::1"),
        (trusting("::1/128"), "[::1]:0", "[::1]", "2001:db8::7, ::1"),
        (
            trusting("127.0.0.1"),
            "[::]:0",
            "127.0.0.1",
            "2001:db8::7, 127.0.0.1",
        ),
    ] {
        let gw = through_listener(&be, &rules, listener);
        let url = format!("http://{connect}:{}/x", gw.listener("extra").port());
        assert_eq!(
            forwarded_for(&url, "2001:db8::7").await.as_deref(),
            Some(want),
            "{rules} {listener} from {connect}"
        );
    }
}

/// A trusted-proxy rule written in the IPv4-mapped form (as `ss` shows the IPv4 peers of a
/// dual-stack listener) is the same rule as the IPv4 one. Before, `::ffff:127.0.0.1` and
/// `::ffff:127.0.0.0/104` were kept as IPv6 ranges, which no peer could match (peers are
/// matched by their IPv4 address), and the proxy's `X-Forwarded-For` was silently ignored.
#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxies_written_ipv4_mapped_match_ipv4_peers() {
    let be = Backend::echo();
    for rule in ["::ffff:127.0.0.1", "::ffff:127.0.0.0/104"] {
        let mut files = proxy_all(&be.url(), "");
        files.push(("gateway.toml", trusting(rule)));
        let gw = Gateway::start(&as_refs(&files));
        assert_eq!(
            forwarded_for(&gw.url("/x"), "203.0.113.9").await.as_deref(),
            Some("203.0.113.9, 127.0.0.1"),
            "{rule}"
        );
    }
}

/// `X-Forwarded-For` entries that carry a port or brackets (`[2001:db8::1]:4711`,
/// `192.0.2.1:4711`, as Azure Application Gateway and some firewalls write them) name the
/// client. Before, such an entry stopped the walk at the trusted proxy, so every client behind
/// it shared the proxy's address: one rate-limit bucket for all of them.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_entries_with_ports_name_the_client_behind_a_trusted_proxy() {
    let be = Backend::echo();
    let mut files = proxy_all(&be.url(), "rate_limit = { requests = 1, per = \"1m\" }");
    files.push(("gateway.toml", trusting("127.0.0.1")));
    let gw = Gateway::start(&as_refs(&files));
    let status = |xff: &'static str| {
        let url = gw.url("/x");
        async move {
            let req = Request::get(url).header("x-forwarded-for", xff);
            send(req.body(full("")).unwrap()).await.status
        }
    };
    assert_eq!(status("[2001:db8:1::1]:4711").await, 200);
    assert_eq!(status("[2001:db8:2::1]:4711").await, 200, "another client");
    assert_eq!(status("[2001:db8:1::2]").await, 429, "the first one's /64");
    assert_eq!(status("192.0.2.1:4711").await, 200, "another client");
    assert_eq!(status("192.0.2.1:80").await, 429, "the same address");
}

/// `rustygate args`: whether it succeeded, and its stderr.
fn run(args: &[&str]) -> (bool, String) {
    let out = rustygate(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), err)
}

/// An IPv6 listen address written without brackets (`::1:8443`, itself an IPv6 address
/// without a port) is refused with the bracketed form to write, located in gateway.toml and
/// named on the command line. Before, both said only that it was not an address (the CLI:
/// "invalid socket address syntax").
#[test]
fn an_ipv6_listen_address_without_brackets_is_refused_with_the_form_to_write() {
    let dir = repo(&[
        (
            "routes/r.toml",
            "[[route]]\nname = \"h\"\npath = \"/\"\nrespond = { status = 200 }\n",
        ),
        (
            "gateway.toml",
            "[[listener]]\nname = \"x\"\naddress = \"::1:8443\"\n",
        ),
    ]);
    let path = dir.path().to_str().unwrap();
    let (ok, err) = run(&["validate", path]);
    assert!(!ok);
    assert!(err.contains("gateway.toml:3:11"), "{err}");
    assert!(
        err.contains("`[::1]:8443` if 8443 is the port, `[::1:8443]:<port>` to bind ::1:8443"),
        "{err}"
    );
    // Refused while parsing the flags: nothing is bound.
    let (ok, err) = run(&["serve", "--repo", path, "--listen", "::1:21630"]);
    assert!(!ok);
    assert!(err.contains("`[::1]:21630`"), "{err}");
    let (ok, err) = run(&["serve", "--repo", path, "--admin-listen", "[::1]"]);
    assert!(!ok);
    assert!(err.contains("add the port: `[::1]:<port>`"), "{err}");
}

/// `[::]:P` is dual-stack: it takes port P on every IPv4 address too, so an IPv4 listener on
/// the same port beside it (nginx's habit of `listen 80; listen [::]:80;`) cannot be bound.
/// Before, `validate` passed such a config and `serve` failed at start-up with "Address already
/// in use"; now `validate` refuses it where it is written. Specific addresses of the two
/// families on one port stay fine, and so do port-0 listeners.
#[test]
fn an_ipv4_listener_beside_a_dual_stack_one_on_the_same_port_is_refused() {
    let route = (
        "routes/r.toml",
        "[[route]]\nname = \"h\"\npath = \"/\"\nrespond = { status = 200 }\n",
    );
    let listeners = |a: &str, b: &str| {
        format!(
            "[[listener]]\nname = \"a\"\naddress = \"{a}\"\n\n\
             [[listener]]\nname = \"b\"\naddress = \"{b}\"\n"
        )
    };
    for (a, b, refused) in [
        ("0.0.0.0:8443", "[::]:8443", true),
        ("[::]:8443", "127.0.0.1:8443", true),
        ("[::]:8443", "[::1]:8443", true),
        ("0.0.0.0:8443", "127.0.0.1:8443", true),
        ("127.0.0.1:8443", "[::1]:8443", false),
        ("0.0.0.0:8443", "[::1]:8443", false),
        ("[::]:0", "0.0.0.0:0", false),
        ("[::]:8443", "0.0.0.0:8444", false),
    ] {
        let toml = listeners(a, b);
        let dir = repo(&[route, ("gateway.toml", &toml)]);
        let (ok, err) = run(&["validate", dir.path().to_str().unwrap()]);
        assert_eq!(ok, !refused, "{a} {b}: {err}");
        if refused {
            assert!(
                err.contains("error[duplicate-listener]") && err.contains("gateway.toml:7:11"),
                "{a} {b}: {err}"
            );
        }
    }
}

/// A route's `host` may be an IPv6 literal, as it may be an IPv4 one: `"[::1]"` or `"::1"`
/// matches a request whose `Host` is `[::1]` or `[::1]:port`. Before, both were refused by
/// `validate` as invalid hosts ("hosts are matched without the port").
#[tokio::test(flavor = "multi_thread")]
async fn a_route_host_may_be_an_ipv6_literal() {
    for host in ["[::1]", "::1"] {
        let routes = format!(
            "[[route]]\nname = \"six\"\nhost = \"{host}\"\npath = \"/\"\n\
             respond = {{ status = 200, body = \"six\" }}\n\n\
             [[route]]\nname = \"any\"\npath = \"/\"\nrespond = {{ status = 200, body = \"any\" }}\n"
        );
        let mut files = vec![("routes/r.toml", routes)];
        with_listener(&mut files, "", "[::1]:0");
        let gw = Gateway::start(&as_refs(&files));
        let six = get(&format!("http://{}/", gw.listener("extra"))).await;
        assert_eq!(six.text(), "six", "{host}: Host [::1]:port");
        let any = get(&gw.url("/")).await;
        assert_eq!(any.text(), "any", "{host}: Host 127.0.0.1:port");
        // The same address written out in full, or in capitals: the same host.
        for written in ["[0:0:0:0:0:0:0:1]", "[0::0:1]:80", "[::0001]"] {
            let head = format!("GET / HTTP/1.1\r\nHost: {written}\r\nConnection: close\r\n\r\n");
            let answer = raw(gw.listener("extra"), head.as_bytes());
            assert!(answer.ends_with("six"), "{host}: Host {written}: {answer}");
        }
    }
}

/// The access line of a request head the listener refuses (400 for `Bad Header: x`) shows an
/// IPv4 client of a dual-stack `[::]` listener as IPv4, as the lines of proxied requests do.
/// Before, it showed `::ffff:127.0.0.1`: one client under two addresses in the access log.
#[test]
fn refused_heads_of_ipv4_clients_of_a_dual_stack_listener_are_logged_as_ipv4() {
    let (gw, port, _dir) = GatewayProcess::start_on_own_port(|port| {
        let dir = repo(&[
            (
                "routes/r.toml",
                "[[route]]\nname = \"h\"\npath = \"/\"\nrespond = { status = 200 }\n",
            ),
            (
                "gateway.toml",
                &format!("[[listener]]\nname = \"dual\"\naddress = \"[::]:{port}\"\n"),
            ),
        ]);
        let args = vec!["--repo".to_owned(), dir.path().display().to_string()];
        (args, dir)
    });
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let answer = raw(to, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw(
        to,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let access = |status: u64| {
        gw.logs.lock().unwrap().lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["target"] == "rustygate::access" && v["status"] == status).then_some(v)
        })
    };
    assert!(wait_until(std::time::Duration::from_secs(10), || {
        access(400).is_some() && access(200).is_some()
    }));
    for status in [400, 200] {
        let line = access(status).unwrap();
        assert_eq!(line["client_ip"], "127.0.0.1", "{status}: {line}");
    }
}

/// A shared rate limit on a Redis bound to `::1` only, named `redis://[::1]:port/`: the
/// store is reached (the limit holds across requests, and its key is in that Redis).
#[test]
fn a_redis_store_on_ipv6_loopback_holds_the_shared_limit() {
    let Some(redis) = common::redis_server::RedisServer::start_ipv6() else {
        return;
    };
    assert!(redis.url().starts_with("redis://[::1]:"), "{}", redis.url());
    let be = Backend::echo();
    let mut files = proxy_all(
        &be.url(),
        "rate_limit = { requests = 1, per = \"1m\", store = \"redis\" }",
    );
    files.push((
        "gateway.toml",
        format!(
            "[rate_limit_store]\nurl = \"{}\"\ntimeout = \"2s\"\non_store_error = \"allow\"\n",
            redis.url()
        ),
    ));
    let gw = Gateway::start(&as_refs(&files));
    assert_eq!(gw.get("/x").0, 200);
    assert_eq!(gw.get("/x").0, 429, "the shared bucket, counted in Redis");
    assert!(
        !redis.keys("rustygate:rl:*").is_empty(),
        "the limit's key is in the Redis on ::1"
    );
}
