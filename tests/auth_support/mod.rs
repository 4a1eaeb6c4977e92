//! Signed tokens, a JWKS server and request helpers shared by the auth tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

use super::common::*;

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fixed ES256 key pair (test-only, derived from a constant).
pub struct Keys {
    secret: p256::SecretKey,
}

impl Keys {
    pub fn new(seed: u8) -> Keys {
        Keys {
            secret: p256::SecretKey::from_slice(&[seed; 32]).unwrap(),
        }
    }

    pub fn encoding(&self) -> EncodingKey {
        EncodingKey::from_ec_pem(self.secret.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
            .unwrap()
    }

    pub fn jwk(&self, kid: &str) -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_str(&self.secret.public_key().to_jwk_string()).unwrap();
        v["kid"] = kid.into();
        v["alg"] = "ES256".into();
        v["use"] = "sig".into();
        v
    }

    pub fn public_pem(&self) -> String {
        self.secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    pub fn token(&self, kid: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, &claims, &self.encoding()).unwrap()
    }
}

pub fn claims() -> serde_json::Value {
    serde_json::json!({"sub": "ana", "iss": "https://issuer.test", "aud": "orders-api", "exp": now() + 300, "scope": "orders:read", "tenant": "acme"})
}

/// A JWKS server whose document can be swapped, counting fetches.
pub fn jwks_server(
    doc: Arc<std::sync::Mutex<serde_json::Value>>,
    hits: Arc<AtomicUsize>,
) -> Backend {
    Backend::start(move |_req| {
        hits.fetch_add(1, Ordering::SeqCst);
        let body = doc.lock().unwrap().to_string();
        async move {
            http::Response::builder()
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        }
    })
}

pub fn req(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    let resp = raw(gw.addr, r.as_bytes());
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head[9..12].parse().unwrap(),
        head.to_ascii_lowercase(),
        body.to_owned(),
    )
}

pub fn upstream_header(body: &str, name: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0] == name)
        .map(|h| h[1].as_str().unwrap().to_owned())
        .collect()
}

impl Keys {
    /// A token with a header of the caller's making (`kid` and `alg` set here).
    pub fn token_with(&self, kid: &str, mut h: Header, claims: serde_json::Value) -> String {
        h.alg = Algorithm::ES256;
        h.kid = Some(kid.into());
        encode(&h, &claims, &self.encoding()).unwrap()
    }
}

/// The request target the echo backend received.
pub fn upstream_uri(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["uri"].as_str().unwrap().to_owned()
}

/// The names of every header the echo backend received.
pub fn upstream_header_names(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_owned())
        .collect()
}

/// A JWKS server serving `keys`' JWK under `kid`, and the URL of its document.
pub fn static_jwks(keys: &Keys, kid: &str, path: &str) -> (Backend, String) {
    let doc = Arc::new(std::sync::Mutex::new(
        serde_json::json!({"keys": [keys.jwk(kid)]}),
    ));
    let be = jwks_server(doc, Arc::new(AtomicUsize::new(0)));
    let url = format!("{}/{path}", be.url());
    (be, url)
}
