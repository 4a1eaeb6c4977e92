//! Rate-limit keys cost bounded memory whatever clients send: 100,000 distinct 30 KB header
//! values (the largest a header can be) held by one limit stay well under 50 MiB, measured both
//! as what the limiter holds and as the growth of this process's resident memory. Alone in its
//! own test binary so that no other test's allocations show up in VmRSS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rustygate::filters::rate_limit::{
    Decision, KeyValue, LimitKey, LimitSpec, Limiter, LocalLimiter,
};

fn vm_rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
fn a_hundred_thousand_30_kb_keys_stay_under_50_mib() {
    const MIB: usize = 1024 * 1024;
    let spec = LimitSpec {
        requests: 10,
        per: Duration::from_secs(3600),
        burst: 10,
        key: LimitKey::Header(http::HeaderName::from_static("x-api-key")),
        shared: None,
        ipv6_prefix: 64,
    };
    let limiter = LocalLimiter::new(&spec).unwrap();
    // One 30 KB buffer, made distinct per key in its first bytes, as a client would send.
    let mut value = vec![b'k'; 30 * 1024];
    let before = vm_rss_bytes();
    for i in 0..100_000u64 {
        value[..20].copy_from_slice(format!("{i:020}").as_bytes());
        let key = KeyValue::text(&value);
        assert!(matches!(limiter.check(&key), Decision::Allowed { .. }));
        if i % 10_000 == 9_999 {
            // Fail early (at 300 MB of keys, not 3 GB) if keys were ever stored whole.
            let held = limiter.held_bytes();
            assert!(held < 50 * MIB, "{held} bytes held after {} keys", i + 1);
        }
    }
    let after = vm_rss_bytes();
    // The cap (100,000) is hard; evictions may start a little below it (see `CappedStore`).
    let tracked = limiter.tracked_keys();
    assert!((90_000..=100_000).contains(&tracked), "{tracked} keys");
    let held = limiter.held_bytes();
    let grown = after.saturating_sub(before);
    eprintln!(
        "100,000 keys of 30 KB: limiter holds {:.1} MiB, VmRSS grew {:.1} MiB",
        held as f64 / MIB as f64,
        grown as f64 / MIB as f64
    );
    assert!(held < 50 * MIB, "limiter holds {held} bytes");
    assert!(grown < 50 * MIB, "VmRSS grew by {grown} bytes");
}
