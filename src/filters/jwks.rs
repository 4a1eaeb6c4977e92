//! JWKS: signing keys fetched from a URL, cached by URL for the life of the process (not of a
//! snapshot), refreshed on a TTL and when a token names a key the cache does not have.
//!
//! An unknown `kid` triggers at most one fetch per `min_refresh` interval however many requests
//! ask (no stampede: they wait on the one fetch in flight), and so does a signature that the
//! cached key for a known `kid` does not verify (the issuer may have replaced the key under the
//! same `kid`). A failed fetch keeps the keys already cached; with no key, verification fails
//! (never open).
//!
//! One fetch, connecting, the answer's head and its body, has [`FETCH_TIMEOUT`] in all, and a
//! request waits for it a little longer ([`WAIT_FOR_FETCH`]): a fetch a request waits on always
//! ends (with keys or failed) before the request gives up on it.
//!
//! A refresh keeps the very same key object for a `kid` whose JWK did not change, so the
//! verified-token caches can ask [`JwksCache::still_publishes`] whether the key that verified a
//! token is still served: a `kid` the issuer withdrew (or re-keyed) stops answering from any
//! worker's cache as soon as the refreshed set is in.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Time allowed for one JWKS fetch, from connecting to the last byte of the body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for the fetch its token needs: the fetch's own limit plus room for
/// the task that runs it to be scheduled, so the fetch always ends first.
pub const WAIT_FOR_FETCH: Duration = FETCH_TIMEOUT.saturating_add(Duration::from_secs(1));
/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1 << 20;

/// `rustygate_jwks_fetches_total{result}`: JWKS fetches of the process (the caches are the
/// process's), registered with every gateway's metrics. Both series exist from the start.
pub static FETCHES: LazyLock<prometheus::IntCounterVec> = LazyLock::new(|| {
    let c = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "rustygate_jwks_fetches_total",
            "JWKS fetches, by result (success, failure: the cached keys are kept).",
        ),
        &["result"],
    )
    .unwrap_or_else(|_| unreachable!("constant metric definition"));
    c.with_label_values(&["success"]);
    c.with_label_values(&["failure"]);
    c
});

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, (Jwk, Arc<DecodingKey>)>,
    /// Keys without a `kid`, tried for tokens without one.
    anonymous: Vec<(Jwk, Arc<DecodingKey>)>,
    fetched_at: Option<Instant>,
}

#[derive(Default)]
struct Refresh {
    in_flight: bool,
    last_attempt: Option<Instant>,
}

/// What the caches of one URL share: the keys and the refresh in flight.
struct Shared {
    url: String,
    keys: ArcSwap<KeySet>,
    refresh: Mutex<Refresh>,
    done: tokio::sync::Notify,
}

/// One provider's view of the JWKS at a URL: the keys are shared by every provider and
/// snapshot that names the URL; the TTL and minimum refresh interval are this provider's, so
/// a config that only changes them keeps the keys and applies the new intervals.
pub struct JwksCache {
    shared: Arc<Shared>,
    ttl: Duration,
    min_refresh: Duration,
}

/// The keys of every JWKS URL of the process: a config swap that keeps the URL keeps the keys.
static REGISTRY: LazyLock<Mutex<HashMap<String, Arc<Shared>>>> = LazyLock::new(Default::default);

impl JwksCache {
    /// The cache for `url`, sharing its keys with every provider and snapshot that names it.
    pub fn for_url(url: &str, ttl: Duration, min_refresh: Duration) -> Arc<JwksCache> {
        let mut reg = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let shared = Arc::clone(reg.entry(url.to_owned()).or_insert_with(|| {
            Arc::new(Shared {
                url: url.to_owned(),
                keys: ArcSwap::from_pointee(KeySet::default()),
                refresh: Mutex::new(Refresh::default()),
                done: tokio::sync::Notify::new(),
            })
        }));
        Arc::new(JwksCache {
            shared,
            ttl,
            min_refresh,
        })
    }

    /// The key for `kid` that may verify a token signed with `alg` (`None`: any): a JWK whose
    /// `alg` names another algorithm is not one (RFC 7517 4.4, RFC 8725 3.1).
    fn find(&self, kid: Option<&str>, alg: Option<Algorithm>) -> Option<Arc<DecodingKey>> {
        let set = self.shared.keys.load();
        let fits = |(jwk, _): &&(Jwk, Arc<DecodingKey>)| {
            alg.is_none_or(|alg| {
                jwk.common
                    .key_algorithm
                    .is_none_or(|k| Algorithm::try_from(k).is_ok_and(|a| a == alg))
            })
        };
        let found = match kid {
            Some(k) => set.by_kid.get(k).filter(fits),
            None => set.anonymous.iter().find(fits).or_else(|| {
                (set.by_kid.len() == 1)
                    .then(|| set.by_kid.values().next().filter(fits))
                    .flatten()
            }),
        };
        found.map(|(_, key)| Arc::clone(key))
    }

    /// Starts a refresh when the keys are older than the TTL.
    fn refresh_if_stale(self: &Arc<Self>) {
        let stale = self
            .shared
            .keys
            .load()
            .fetched_at
            .is_none_or(|t| t.elapsed() >= self.ttl);
        if stale {
            let _ = self.start_refresh();
        }
    }

    /// Whether `key` is still what the JWKS serves for `kid`: false once a refresh dropped the
    /// `kid` or replaced its key. Starts a refresh when the keys are older than the TTL, as a
    /// lookup does, so tokens answered from a cache still see the issuer's rotations.
    pub fn still_publishes(self: &Arc<Self>, kid: Option<&str>, key: &Arc<DecodingKey>) -> bool {
        self.refresh_if_stale();
        self.find(kid, None).is_some_and(|k| Arc::ptr_eq(&k, key))
    }

    /// The key for a token's `kid`, fetching the JWKS when it is unknown (rate limited).
    pub async fn key(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Option<Arc<DecodingKey>> {
        if let Some(k) = self.find(kid, Some(alg)) {
            self.refresh_if_stale();
            return Some(k);
        }
        self.refresh_and_wait().await;
        self.find(kid, Some(alg))
    }

    /// Another key for `kid` than `failed`, which did not verify a token's signature: the
    /// issuer may have replaced the key under the same `kid` before the TTL is up. Refreshes as
    /// for an unknown `kid` (rate limited by `min_refresh`, one fetch in flight); `None` when
    /// the JWKS still serves `failed` (or nothing) for it.
    pub async fn replaced_key(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
        failed: &Arc<DecodingKey>,
    ) -> Option<Arc<DecodingKey>> {
        let current = self.find(kid, Some(alg));
        if current.as_ref().is_none_or(|k| Arc::ptr_eq(k, failed)) {
            self.refresh_and_wait().await;
        }
        self.find(kid, Some(alg))
            .filter(|k| !Arc::ptr_eq(k, failed))
    }

    /// Starts a refresh (unless rate limited) and waits for the one in flight, if any.
    async fn refresh_and_wait(self: &Arc<Self>) {
        let done = self.shared.done.notified();
        if self.start_refresh()
            || self
                .shared
                .refresh
                .lock()
                .map(|r| r.in_flight)
                .unwrap_or(false)
        {
            let _ = tokio::time::timeout(WAIT_FOR_FETCH, done).await;
        }
    }

    /// Starts a fetch unless one is running or one started less than `min_refresh` ago.
    fn start_refresh(self: &Arc<Self>) -> bool {
        {
            let mut r = self
                .shared
                .refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if r.in_flight
                || r.last_attempt
                    .is_some_and(|t| t.elapsed() < self.min_refresh)
            {
                return false;
            }
            r.in_flight = true;
            r.last_attempt = Some(Instant::now());
        }
        let this = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let previous = this.keys.load_full();
            match fetch(&this.url, &previous).await {
                Ok(set) => {
                    FETCHES.with_label_values(&["success"]).inc();
                    tracing::info!(url = %this.url, keys = set.by_kid.len() + set.anonymous.len(), "JWKS fetched");
                    this.keys.store(Arc::new(set));
                }
                Err(e) => {
                    FETCHES.with_label_values(&["failure"]).inc();
                    tracing::warn!(url = %this.url, error = %e, "JWKS fetch failed; keeping the cached keys")
                }
            }
            this.refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .in_flight = false;
            this.done.notify_waiters();
        });
        true
    }
}

/// The key for `jwk`: the previous set's own object when the JWK is unchanged.
fn key_for(jwk: &Jwk, previous: Option<&(Jwk, Arc<DecodingKey>)>) -> Option<Arc<DecodingKey>> {
    match previous {
        Some((old, key)) if old == jwk => Some(Arc::clone(key)),
        _ => DecodingKey::from_jwk(jwk).ok().map(Arc::new),
    }
}

/// Fetches the JWKS at `url` within [`FETCH_TIMEOUT`] in all.
async fn fetch(url: &str, previous: &KeySet) -> Result<KeySet, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_unbounded(url, previous))
        .await
        .map_err(|_| format!("timed out after {FETCH_TIMEOUT:?}"))?
}

async fn fetch_unbounded(url: &str, previous: &KeySet) -> Result<KeySet, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| format!("no TLS roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(https);
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let req = http::Request::get(uri)
        .header("accept", "application/json")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let jwks: JwkSet =
        serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut set = KeySet {
        fetched_at: Some(Instant::now()),
        ..KeySet::default()
    };
    for jwk in &jwks.keys {
        // Only signature keys (RFC 7517 4.2, 4.4): an encryption key (`use` other than `sig`,
        // or an `alg` that is not a signature algorithm) never verifies a token.
        let for_signing = jwk
            .common
            .public_key_use
            .as_ref()
            .is_none_or(|u| *u == PublicKeyUse::Signature)
            && jwk
                .common
                .key_algorithm
                .is_none_or(|k| Algorithm::try_from(k).is_ok());
        if !for_signing {
            continue;
        }
        match &jwk.common.key_id {
            Some(kid) => {
                if let Some(key) = key_for(jwk, previous.by_kid.get(kid)) {
                    set.by_kid.insert(kid.clone(), (jwk.clone(), key));
                }
            }
            None => {
                let old = previous.anonymous.iter().find(|(old, _)| old == jwk);
                if let Some(key) = key_for(jwk, old) {
                    set.anonymous.push((jwk.clone(), key));
                }
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The head of the answer came within its 5 s and the body within 5 s more, so a fetch ran
    /// for up to 10 s while the request waiting on it gave up after 6 s, and was refused with
    /// the fetch still running (its keys arrived for later requests only). A JWKS server on
    /// loopback sends its head after 4 s and its body 4 s later.
    #[tokio::test]
    async fn a_fetch_ends_before_the_request_waiting_on_it_gives_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 2048];
            let _ = conn.read(&mut request).await;
            let body = br#"{"keys":[]}"#;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            tokio::time::sleep(Duration::from_secs(4)).await;
            let _ = conn.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(4)).await;
            let _ = conn.write_all(body).await;
        });
        let cache = JwksCache::for_url(
            &format!("http://{addr}/slow.json"),
            Duration::from_secs(600),
            Duration::from_secs(30),
        );
        assert!(cache.key(Some("k1"), Algorithm::ES256).await.is_none());
        let in_flight = cache
            .shared
            .refresh
            .lock()
            .map(|r| r.in_flight)
            .unwrap_or(true);
        assert!(
            !in_flight,
            "the request gave up while the fetch it waited on was still running"
        );
        server.abort();
    }
}
