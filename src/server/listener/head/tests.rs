use super::*;

#[test]
fn chunked_request_heads_are_told_as_actix_http_tells_them() {
    let te = |h: &[u8]| scan_head(h).map(|h| h.transfer_encoding);
    assert_eq!(
        te(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Some(true)
    );
    assert_eq!(
        te(b"POST / HTTP/1.1\r\nTRANSFER-ENCODING:chunked\r\n\r\n"),
        Some(true)
    );
    assert_eq!(
        te(b"POST / HTTP/1.1\r\nx-transfer-encoding: a\r\n\r\n"),
        Some(false)
    );
    assert_eq!(te(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"), Some(false));
    assert_eq!(
        te(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n"),
        None
    );
    for (head, chunked) in [
        (
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            true,
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding:  Chunked \r\nhost: a\r\n\r\n",
            true,
        ),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            true,
        ),
        // HTTP/1.0 ignores it; two fields, or another coding, are a 400 before any body.
        (
            b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        ),
        (b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\n", false),
    ] {
        assert_eq!(
            is_chunked_request(head),
            chunked,
            "{}",
            String::from_utf8_lossy(head)
        );
    }
}

#[test]
fn a_head_cut_across_reads_is_found_as_whole_and_each_byte_is_scanned_a_bounded_number_of_times() {
    let long = format!("cookie: {}\r\n", "c".repeat(3000));
    let heads = [
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
        "POST / HTTP/1.1\r\nhost: a\r\nCONTENT-LENGTH: 5\r\n\r\nhello".to_owned(),
        format!("POST / HTTP/1.1\r\n{long}transfer-encoding: chunked\r\n{long}\r\n5\r\n"),
        format!("GET / HTTP/1.1\r\n{long}x-content-length: 1\r\n\r\nGET /"),
        format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(5000)),
    ];
    for whole in &heads {
        let whole = whole.as_bytes();
        let want = scan_head(whole).expect("a whole head");
        for piece in [1, 2, 3, 7, 17, 18, 19, 64, 1000] {
            let mut partial = PartialHead::default();
            let mut found = None;
            for chunk in whole.chunks(piece) {
                if let Some(head) = partial.extend(chunk) {
                    found = Some(head);
                    break;
                }
                // What the next read scans again: at most the last line's first bytes.
                let again = partial.bytes.len() - partial.next;
                assert!(again <= Names::NAME_LOOKAHEAD, "{piece}: {again}");
            }
            assert_eq!(found, Some(want), "pieces of {piece}");
        }
    }
}

#[test]
fn sized_request_bodies_are_told_as_actix_http_tells_them() {
    let body = |h: &[u8]| {
        let head = scan_head(h).expect("a whole head");
        match request_body(head, &h[..head.end]) {
            Some(Left::Bytes(n)) => Some(n),
            Some(Left::Chunks(_)) => Some(u64::MAX),
            None => None,
        }
    };
    for (head, want) in [
        (
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"[..],
            Some(5),
        ),
        (
            b"POST / HTTP/1.1\r\nhost: a\r\nCONTENT-LENGTH:12\r\n\r\n",
            Some(12),
        ),
        (
            b"GET / HTTP/1.0\r\ncontent-length: 18446744073709551615\r\n\r\n",
            Some(u64::MAX),
        ),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            Some(u64::MAX),
        ),
        // No body: none announced, or zero.
        (b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nx-content-length: 5\r\n\r\n", None),
        // Refused by the decoder (400, then close): a sign, not digits, two fields, too big.
        (b"POST / HTTP/1.1\r\ncontent-length: +5\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\ncontent-length: 5 5\r\n\r\n", None),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            None,
        ),
        (
            b"POST / HTTP/1.1\r\ncontent-length: 18446744073709551616\r\n\r\n",
            None,
        ),
        // What follows is a tunnel's.
        (
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\ncontent-length: 5\r\n\r\n",
            None,
        ),
        (b"CONNECT a:443 HTTP/1.1\r\ncontent-length: 5\r\n\r\n", None),
    ] {
        assert_eq!(body(head), want, "{}", String::from_utf8_lossy(head));
    }
}

#[test]
fn an_upgrade_other_than_websocket_loses_its_connection_token() {
    let mut h2c = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
        Upgrade: h2c\r\nconnection: keep-alive,upgrade\r\n\r\n"
        .to_vec();
    plain_if_not_websocket(&mut h2c);
    assert_eq!(
        String::from_utf8(h2c).unwrap(),
        "GET / HTTP/1.1\r\nHost: a\r\nConnection:        , HTTP2-Settings\r\n\
         Upgrade: h2c\r\nconnection: keep-alive,       \r\n\r\n"
    );
    let ws = b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let mut kept = ws.to_vec();
    plain_if_not_websocket(&mut kept);
    assert_eq!(kept, ws);
}

#[test]
fn a_connection_field_naming_upgrade_marks_the_head_for_the_rewrite() {
    let flagged = |h: &[u8]| scan_head(h).expect("a whole head").upgrade;
    for head in [
        &b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nhost: a\r\nCONNECTION:keep-alive, Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nupgrade: h2c\r\n\r\n",
    ] {
        assert!(flagged(head), "{}", String::from_utf8_lossy(head));
    }
    for head in [
        &b"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nx-connection: upgrade\r\ncontent-type: upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nconnection: close\r\nx-a: upgrade\r\n\r\n",
    ] {
        assert!(!flagged(head), "{}", String::from_utf8_lossy(head));
    }
    // Blanked without an `Upgrade` field too: an ordinary request.
    let mut alone = b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n".to_vec();
    plain_if_not_websocket(&mut alone);
    assert_eq!(alone, b"GET / HTTP/1.1\r\nConnection:        \r\n\r\n");
    // Cut before the value's line feed: flagged, to be looked at whole.
    let mut partial = PartialHead::default();
    assert_eq!(
        partial.extend(b"GET / HTTP/1.1\r\nConnection: keep-alive, upgr"),
        None
    );
    let head = partial.extend(b"ade\r\n\r\n").expect("whole");
    assert!(head.upgrade);
}

#[test]
fn a_line_feed_without_its_carriage_return_marks_the_head_refused() {
    for (bytes, at) in [
        (&b"GET / HTTP/1.1\nHost: a\n\n"[..], 15),
        (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 24),
        (b"\nGET / HTTP/1.1\r\n\r\n", 1),
    ] {
        let head = scan_head(bytes).expect("refused at the bare line feed");
        assert!(head.bare_lf, "{}", String::from_utf8_lossy(bytes));
        assert_eq!(head.end, at, "{}", String::from_utf8_lossy(bytes));
        assert_eq!(head_end(bytes), None);
    }
    let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nmore";
    assert!(
        !scan_head(whole).unwrap().bare_lf,
        "after the head: the body's"
    );
}

#[test]
fn a_head_ends_at_its_first_empty_line() {
    assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
    assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nGET"), Some(24));
    assert_eq!(head_end(b"\r\n\r\n"), Some(4));
    for cut in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"GET / HTTP/1.1\r\n\r",
        b"\n\n\n",
        b"",
    ] {
        assert_eq!(head_end(cut), None, "{}", String::from_utf8_lossy(cut));
    }
    // Against the plain definition, with the empty line at every offset and after bytes
    // that may fool the word test (0x0b, 0x01, 0x8a, more line feeds).
    let naive = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    for fill in [b'a', 0x0b, 0x01, 0x8a, b'\r'] {
        for at in 0..40 {
            let mut b = vec![fill; at];
            b.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n");
            assert_eq!(head_end(&b), naive(&b), "fill {fill:#x} at {at}");
            b.truncate(at + 3);
            assert_eq!(head_end(&b), naive(&b), "cut: fill {fill:#x} at {at}");
        }
    }
}

#[test]
fn only_what_follows_a_whole_plain_head_without_a_body_is_held() {
    let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(bodyless_head_end(get), Some(get.len()));
    let two = [&get[..], b"HEAD /b HTTP/1.1\r\n\r\n"].concat();
    assert_eq!(bodyless_head_end(&two), Some(get.len()));
    let empty = b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    let two = [&empty[..], get].concat();
    assert_eq!(bodyless_head_end(&two), Some(empty.len()));
    // Served as plain requests: an upgrade to something else than WebSocket, a method in
    // lower case.
    for plain in [
        &b"GET /a HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"[..],
        b"GET /a HTTP/1.1\r\nUpgrade: foo\r\n\r\n",
        // WebSocket among other tokens: not a handshake to actix-http either.
        b"GET /ws HTTP/1.1\r\nUpgrade: foo, WebSocket\r\nConnection: upgrade\r\n\r\n",
        b"get /a HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let two = [plain, get].concat();
        assert_eq!(bodyless_head_end(&two), Some(plain.len()));
    }
    for framed in [
        &b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\ncontent-length:2\r\n\r\nok",
        b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /a HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nframes",
        b"CONNECT a:443 HTTP/1.1\r\n\r\ntunnel",
        // Cut short, leading empty lines, not HTTP/1.x: nothing is held.
        b"GET /a HTTP/1.1\r\nHost: x\r\n",
        b"\r\nGET /a HTTP/1.1\r\n\r\n",
        b"GET /a\r\n\r\n",
        b"",
    ] {
        assert_eq!(
            bodyless_head_end(framed),
            None,
            "{}",
            String::from_utf8_lossy(framed)
        );
    }
}
