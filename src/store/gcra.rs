//! GCRA in the store: one Lua script per check, so a check is one round-trip and atomic across
//! replicas. The script reads Redis's own clock (`TIME`), so clock skew between replicas does
//! not matter, and answers what the `RateLimit-*` and `Retry-After` headers need.
//!
//! A bucket is one string key holding the theoretical arrival time (TAT) in microseconds of the
//! store's clock; it expires when the bucket is full again, so idle keys cost nothing. The
//! script is called by its SHA (`EVALSHA`) and loaded again when the store answers `NOSCRIPT`
//! (a restart, a failover, `SCRIPT FLUSH`).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, ServerErrorKind};
use sha1::{Digest, Sha1};

use super::StoreError;

/// KEYS[1]: the bucket. ARGV[1]: emission interval in µs (`per ÷ requests`). ARGV[2]: burst.
/// Returns `{allowed (1|0), remaining, retry_after µs, reset µs}`; `reset` is the time until
/// the bucket is full again.
pub const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
local remaining = math.floor((interval * burst - (new_tat - now)) / interval)
return {1, remaining, 0, new_tat - now}
"#;

/// The script's SHA-1, as `EVALSHA` wants it.
pub fn script_sha() -> String {
    hex::encode(Sha1::digest(SCRIPT.as_bytes()))
}

/// What the store decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Requests left in the burst after this one.
    pub remaining: u32,
    /// When limited: time until a request is allowed again.
    pub retry_after: Duration,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// One check of `key` against `interval`/`burst`. On `NOSCRIPT` the script is loaded and the
/// call made once more.
pub async fn check(
    mut conn: MultiplexedConnection,
    sha: &str,
    key: &[u8],
    interval: Duration,
    burst: u32,
) -> Result<Outcome, StoreError> {
    let interval_us = interval.as_micros().max(1) as u64;
    let mut evalsha = redis::cmd("EVALSHA");
    evalsha
        .arg(sha)
        .arg(1)
        .arg(key)
        .arg(interval_us)
        .arg(burst.max(1));
    let answer: Vec<i64> = match evalsha.query_async(&mut conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            let loaded: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPT)
                .query_async(&mut conn)
                .await?;
            if loaded != sha {
                return Err(StoreError::Answer(format!(
                    "SCRIPT LOAD answered {loaded}, not {sha}"
                )));
            }
            tracing::info!("rate-limit script loaded into the store again (NOSCRIPT)");
            evalsha.query_async(&mut conn).await?
        }
        r => r?,
    };
    let &[allowed, remaining, retry_after, reset] = answer.as_slice() else {
        return Err(StoreError::Answer(format!("{answer:?}")));
    };
    // Held to what the script can answer for this limit, whatever the store says (a hostile
    // or confused store, a clock that jumped back): a refused request may retry within one
    // emission interval, the bucket is full again within `burst` intervals. An unbounded
    // answer would set `Retry-After` to centuries and keep the key in the over-limit cache.
    let burst = burst.max(1);
    let full = interval.saturating_mul(burst);
    let us = |v: i64, max: Duration| Duration::from_micros(v.max(0) as u64).min(max);
    Ok(Outcome {
        allowed: allowed == 1,
        remaining: remaining.clamp(0, i64::from(burst)) as u32,
        retry_after: us(retry_after, interval),
        reset: us(reset, full),
    })
}
