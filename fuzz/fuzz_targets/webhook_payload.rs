//! The webhook endpoints' input handling: the GitHub signature check, the GitLab token
//! comparison, and the push payload parser, each against an oracle written independently here.
//!
//! * `secret_matches` is byte equality, and an empty secret never matches;
//! * `github_signature_ok` accepts exactly `sha256=<hex of HMAC-SHA256(secret, body)>`: the
//!   fuzzer may send the real signature, a damaged one, or bytes of its own;
//! * `parse_push` reads a push only from a JSON object with a string `ref`, and `push_action`
//!   reloads only for the tracked branch (or any ref when none is tracked), never for a deletion
//!   or a commit already seen.
#![no_main]

use arbitrary::Arbitrary;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use rustygate::server::webhooks::{
    PushAction, github_signature_ok, parse_push, push_action, secret_matches,
};
use sha2::Sha256;

#[derive(Arbitrary, Debug)]
enum Signature {
    /// No header.
    Missing,
    /// The right signature, as GitHub sends it.
    Right,
    /// The right signature with upper-case hex.
    RightUpper,
    /// The right signature cut to this many bytes of its hex.
    Cut(u8),
    /// The right signature with one hex digit changed.
    Flipped(u8),
    /// The right signature under another prefix (`sha1=`, `SHA256=`, ...).
    Prefix(Vec<u8>),
    /// Bytes of the fuzzer's own.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    secret: &'a str,
    given: &'a [u8],
    signature: Signature,
    body: &'a [u8],
}

fn right_hex(secret: &str, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        unreachable!("HMAC takes keys of any length");
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fuzz_target!(|input: Input<'_>| {
    let Input {
        secret,
        given,
        signature,
        body,
    } = input;

    assert_eq!(
        secret_matches(secret, given),
        !secret.is_empty() && secret.as_bytes() == given,
        "secret_matches({secret:?}, {given:?})"
    );

    let right = right_hex(secret, body);
    let (header, expect): (Option<Vec<u8>>, bool) = match signature {
        Signature::Missing => (None, false),
        Signature::Right => (Some(format!("sha256={right}").into_bytes()), true),
        Signature::RightUpper => (
            Some(format!("sha256={}", right.to_ascii_uppercase()).into_bytes()),
            true,
        ),
        Signature::Cut(n) => {
            let n = usize::from(n) % right.len();
            (Some(format!("sha256={}", &right[..n]).into_bytes()), false)
        }
        Signature::Flipped(i) => {
            let mut hex = right.into_bytes();
            let i = usize::from(i) % hex.len();
            hex[i] = if hex[i] == b'0' { b'1' } else { b'0' };
            let mut h = b"sha256=".to_vec();
            h.extend_from_slice(&hex);
            (Some(h), false)
        }
        Signature::Prefix(p) => {
            let same = p == b"sha256=";
            let mut h = p;
            h.extend_from_slice(right.as_bytes());
            (Some(h), same)
        }
        // Forging an HMAC is out of the fuzzer's reach: own bytes verify only if they happen
        // to spell the right signature.
        Signature::Raw(r) => {
            let same = r.strip_prefix(b"sha256=").is_some_and(|h| {
                h.len() == right.len() && h.eq_ignore_ascii_case(right.as_bytes())
            });
            (Some(r), same)
        }
    };
    let ok = github_signature_ok(secret, body, header.as_deref());
    assert_eq!(
        ok,
        expect && !secret.is_empty(),
        "github_signature_ok({secret:?}, {body:?}, {header:?})"
    );

    let push = parse_push(body);
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let expected_ref = json
        .as_ref()
        .and_then(|v| v.get("ref")?.as_str().map(str::to_owned));
    assert_eq!(
        push.as_ref().map(|p| p.reference.clone()),
        expected_ref,
        "parse_push({body:?})"
    );
    if let Some(push) = push {
        let branch = push.reference.strip_prefix("refs/heads/");
        for tracked in [Some("main"), branch, None] {
            let action = push_action(&push, tracked, |_| None);
            if action == PushAction::Reload {
                assert!(!push.deleted, "a deletion reloads: {push:?}");
                if let Some(t) = tracked {
                    assert_eq!(branch, Some(t), "another ref reloads {t}: {push:?}");
                }
            }
            // A commit already applied or attempted never reloads.
            let seen = push_action(&push, tracked, |_| Some("already applied"));
            if push.after.is_some() {
                assert_ne!(seen, PushAction::Reload, "a seen commit reloads: {push:?}");
            }
        }
    }
});
