//! The raw shape of the config repo's TOML files, exactly as written.
//!
//! These types only describe syntax: every field keeps its span and nothing here checks meaning.
//! Semantic checks (references, conflicts, units) live in `compile`. Rules, after Apollo Router:
//! `deny_unknown_fields` everywhere, defaults on the struct, no negative booleans, no `flatten`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::Spanned;

/// A duration written as text: `"250ms"`, `"5s"`, `"1m"`, `"1h 30m"` (the grammar is
/// [`super::units::parse_duration`]'s, and so is the schema's pattern).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DurationText(pub String);

impl JsonSchema for DurationText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration: a whole number and a unit (ns, us, ms, s, m, h, d), or several, e.g. \"250ms\", \"5s\", \"1m\", \"1m 30s\".",
            "pattern": super::units::duration_pattern()
        })
    }
}

/// A size written as text: `"512"`, `"64KiB"`, `"10MiB"`, `"1GB"`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SizeText(pub String);

impl JsonSchema for SizeText {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Size".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A size in bytes with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. \"10MiB\".",
            "pattern": "^\\s*[0-9]+\\s*([KMG]i?B|B)?\\s*$"
        })
    }
}

/// `gateway.toml`: repo-wide defaults. Optional; every field has a default.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Defaults applied to every route and upstream that does not set its own.
    #[serde(default)]
    pub defaults: Defaults,
    /// How the client address is found when the gateway sits behind other proxies.
    #[serde(default)]
    pub client_ip: ClientIp,
    /// Named CORS presets that routes refer to with `cors = "<name>"`.
    #[serde(default)]
    pub cors: BTreeMap<String, Spanned<RawCors>>,
    /// A rate limit for every route that does not set its own (e.g. 100 per minute per IP).
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// The Redis that rate limits with `store = "redis"` share across replicas, and where
    /// replicas publish which commit they serve (docs/scale-out.md).
    pub rate_limit_store: Option<Spanned<RawRateLimitStore>>,
    /// Named authentication providers that routes refer to with `auth = "<name>"`.
    #[serde(default)]
    pub auth: BTreeMap<String, Spanned<RawAuthProvider>>,
    /// Hard limits for Rhai policy scripts; a hook that exceeds one fails its request with 500.
    #[serde(default)]
    pub policy_limits: PolicyLimits,
    /// A policy for every route that does not name its own, relative to the repo root.
    pub policy: Option<Spanned<String>>,
    /// `req.config` for the default policy.
    pub policy_config: Option<Spanned<serde_json::Map<String, serde_json::Value>>>,
    /// Limits on client connections and slow clients (docs/security.md).
    #[serde(default)]
    pub limits: RawLimits,
    /// Which client request headers the gateway accepts.
    #[serde(default)]
    pub headers: ClientHeaderRules,
    /// How request paths are read before routing.
    #[serde(default)]
    pub paths: RawPaths,
    /// Listeners the gateway opens besides `--listen`: plain HTTP, or HTTPS with `tls`
    /// (docs/tls.md). Bound at start-up; their certificates follow each reload.
    #[serde(default)]
    pub listener: Vec<Spanned<RawListener>>,
    /// OpenTelemetry tracing (README, "Tracing").
    pub tracing: Option<Spanned<super::raw_tracing::RawTracing>>,
    /// WASM plugins (proxy-wasm ABI, docs/plugins.md): `[plugin.<name>]` names a `.wasm` file
    /// of the repo and pins its sha256.
    #[serde(default)]
    pub plugin: BTreeMap<String, Spanned<RawPlugin>>,
    /// Plugins every route runs, in order, before the route's own `plugins`.
    #[serde(default)]
    pub plugins: Vec<Spanned<RawPluginUse>>,
}

/// `[plugin.tag]`: a WASM plugin of the repo.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The `.wasm` file, relative to the repo root, e.g. "plugins/tag.wasm".
    pub file: Spanned<String>,
    /// The file's sha256 in hex (`sha256sum plugins/tag.wasm`): a file that does not match is
    /// refused, so a plugin changes only with a reviewed config change.
    pub sha256: Spanned<String>,
    /// What a request gets when the plugin traps or runs over a limit: `fail_closed` (500, the
    /// default) or `fail_open` (the request goes on without the plugin).
    #[serde(default)]
    pub on_error: RawOnError,
    /// Instructions one call into the plugin may run (default 10,000,000).
    pub max_instructions: Option<Spanned<u64>>,
    /// Memory one instance of the plugin may have (default "16MiB"), in 64 KiB pages.
    pub max_memory: Option<Spanned<SizeText>>,
}

/// A plugin's answer to its own failure.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawOnError {
    /// The request is answered 500 with a JSON error and its request id.
    #[default]
    FailClosed,
    /// The request goes on without the plugin; the failure is logged and counted.
    FailOpen,
}

/// `{ name = "tag", config = { value = "edge" } }`: a plugin and its configuration.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPluginUse {
    /// A plugin declared as `[plugin.<name>]` in `gateway.toml`.
    pub name: Spanned<String>,
    /// What the plugin reads in `proxy_on_configure`: a string as written, anything else as
    /// JSON.
    pub config: Option<Spanned<serde_json::Value>>,
}

/// One `[[listener]]` of gateway.toml.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name, used in metrics and logs.
    pub name: Spanned<String>,
    /// `ip:port` to bind, e.g. "0.0.0.0:8443".
    pub address: Spanned<String>,
    /// Terminate TLS on this listener. Absent: plain HTTP.
    pub tls: Option<Spanned<RawListenerTls>>,
    /// Answer every request with 308 to the same URL on the HTTPS listener (plain listeners
    /// only; needs a listener with `tls`). Default false.
    pub redirect_to_https: Option<Spanned<bool>>,
    /// Offer HTTP/2 (by ALPN on TLS listeners). Default: true with `tls`, false without.
    pub http2: Option<Spanned<bool>>,
}

/// `tls = { ... }` of a listener.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    /// Certificates with their keys; the client's SNI picks one by the certificate's DNS names,
    /// the first one answers clients without SNI or with an unknown name.
    pub certificates: Spanned<Vec<Spanned<RawServerCertificate>>>,
    /// Lowest TLS version accepted: "1.2" (default) or "1.3".
    pub min_version: Option<Spanned<String>>,
    /// ALPN protocols offered, in order of preference: "h2", "http/1.1".
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    /// Ask clients for a certificate signed by `ca` (mutual TLS).
    pub client_auth: Option<Spanned<RawClientAuth>>,
}

/// A certificate chain (PEM, leaf first) and its private key, both secret references.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServerCertificate {
    /// `{ file = "/run/secrets/api.crt" }` or `{ env = "API_CRT" }`.
    pub cert: Spanned<ValueSource>,
    /// `{ file = "/run/secrets/api.key" }` or `{ env = "API_KEY" }`: PKCS#8, PKCS#1 or SEC1.
    pub key: Spanned<ValueSource>,
}

/// `client_auth = { ca = { file = ... }, required = true }`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClientAuth {
    /// The CA certificates (PEM) client certificates must chain to, as a secret reference.
    pub ca: Spanned<ValueSource>,
    /// Refuse clients without a certificate (default true). With false, a certificate is
    /// verified when one is sent, and requests without one pass with no client-cert headers.
    pub required: Option<Spanned<bool>>,
}

/// `[limits]`: client connections and slow clients. Every field optional, defaults in code.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Time a client has to send each request head, on new and kept-alive connections alike
    /// (default "10s"); then 408 and the connection is closed.
    pub header_timeout: Option<Spanned<DurationText>>,
    /// Longest pause between two pieces of a request body (default "30s"); then 408.
    pub body_idle_timeout: Option<Spanned<DurationText>>,
    /// Longest time a client may leave the gateway's writes to it untaken, its connection's
    /// buffers full (default "60s", as nginx's `send_timeout`); then the connection is closed
    /// and its request abandoned: the upstream connection is closed and its places given back.
    pub send_timeout: Option<Spanned<DurationText>>,
    /// Client connections open at once on the proxy listener, all workers together (default
    /// 25000); beyond it new connections are closed at once.
    pub max_connections: Option<Spanned<u32>>,
    /// Client connections open at once from one client address, an IPv6 client by its /64
    /// (default: no cap).
    pub max_connections_per_ip: Option<Spanned<u32>>,
    /// Request bodies held in memory, per worker (default "64MiB"): bodies read whole for
    /// retries and what WASM plugins hold of request bodies; a request that would go over it
    /// gets 503.
    pub max_buffered_bodies: Option<Spanned<SizeText>>,
    /// Streams one HTTP/2 client connection may have open at once (default 128, as nginx).
    pub http2_max_concurrent_streams: Option<Spanned<u32>>,
    /// Largest request header list an HTTP/2 client may send, decoded (default "32KiB");
    /// beyond it the stream is refused.
    pub http2_max_header_list_size: Option<Spanned<SizeText>>,
    /// Streams an HTTP/2 client may abandon (reset before its response ended) per second on
    /// one connection (default 100); beyond it the connection gets GOAWAY. The defence against
    /// the 2023 "rapid reset" attack.
    pub http2_max_resets_per_second: Option<Spanned<u32>>,
    /// Streams of one HTTP/2 client connection whose request body may be streamed to an
    /// HTTP/1.1 upstream while it is still arriving (default 16): each holds an upstream
    /// connection until its body has all arrived. The bodies of further streams are read whole
    /// first, within `max_buffered_bodies`, as nginx reads request bodies; 0 reads every one
    /// whole first.
    pub http2_max_streaming_uploads: Option<Spanned<u32>>,
    /// Flow-control window of each HTTP/2 client stream (default "1MiB"): how much of one
    /// request body the client may send ahead of the gateway's window updates, so one upload
    /// moves at most this much per round trip of the client's link (1 MiB at 50 ms: about
    /// 20 MB/s). The gateway gives window back only as it forwards the body. Between "64KiB"
    /// and "1GiB".
    pub http2_stream_window: Option<Spanned<SizeText>>,
    /// Flow-control window of each HTTP/2 client connection, all its streams together
    /// (default "16MiB"): the most request data one connection can make the gateway hold
    /// unread. At least `http2_stream_window`, at most "1GiB".
    pub http2_connection_window: Option<Spanned<SizeText>>,
}

/// `[headers]`: rules for the headers of client requests.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientHeaderRules {
    /// Pass on client request headers whose names contain `_` (default false: they are
    /// dropped, like nginx's `underscores_in_headers off`, because many upstream frameworks
    /// read `X_User_Id` as `X-User-Id`, the name of a header the gateway may set itself).
    #[serde(default)]
    pub allow_underscores: bool,
}

/// `[paths]`: how request paths are read before routing.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    /// What an escaped slash (`%2F`) in a request path means. `"reject"` (default): 400, since
    /// many upstreams decode it and would see other segments than the route matched. `"keep"`:
    /// it stays inside its segment and is forwarded as `%2F`, but a `.` or `..` hidden behind it
    /// (`..%2F`) is still refused. `"decode"`: it becomes `/` before dot segments are resolved,
    /// and the upstream gets the resolved path.
    pub escaped_slashes: Option<RawEscapedSlashes>,
}

/// The values of `[paths] escaped_slashes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RawEscapedSlashes {
    Reject,
    Keep,
    Decode,
}

/// `[policy_limits]`: every field optional, defaults in code.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyLimits {
    /// Rhai operations one hook call may run (default 100000).
    pub max_operations: Option<Spanned<u64>>,
    /// Depth of nested function calls (default 32).
    pub max_call_depth: Option<Spanned<u32>>,
    /// Nesting depth of expressions, checked at compile time (default 64).
    pub max_expr_depth: Option<Spanned<u32>>,
    /// Longest string a script may build (default "64KiB").
    pub max_string_size: Option<Spanned<SizeText>>,
    /// Most elements in one array (default 10000).
    pub max_array_size: Option<Spanned<u32>>,
    /// Most entries in one object map (default 10000).
    pub max_map_size: Option<Spanned<u32>>,
    /// Wall-clock time one hook call may take (default "50ms").
    pub budget: Option<Spanned<DurationText>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Time allowed for the upstream to send its response headers (default "30s").
    pub timeout: Option<Spanned<DurationText>>,
    /// Time allowed to open a connection to a target (default "5s").
    pub connect_timeout: Option<Spanned<DurationText>>,
    /// Largest request body accepted (default "10MiB"); larger bodies get 413.
    pub max_body_size: Option<Spanned<SizeText>>,
    /// Longest pause between two pieces of an upstream's response body (default "60s"); then
    /// the client's connection is aborted.
    pub read_timeout: Option<Spanned<DurationText>>,
    /// Whether routes proxy WebSocket upgrades (default true); a route's own `websocket` wins.
    pub websocket: Option<bool>,
    /// Longest a WebSocket tunnel may carry no bytes either way before both sides are closed
    /// (default "1h").
    pub websocket_idle_timeout: Option<Spanned<DurationText>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientIp {
    /// Peers (addresses or CIDR ranges) whose `X-Forwarded-*` headers are believed. Default: none,
    /// so the socket peer is the client and client-sent forwarding headers are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
}

/// `routes/*.toml`: a list of `[[route]]` tables.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    #[serde(default)]
    pub route: Vec<RawRoute>,
}

// The large tables most routes leave out are boxed: a repo may hold 100,000 routes, all loaded
// before they are compiled, and this keeps each one near half a kilobyte. (Not a doc comment:
// those become the JSON Schema's descriptions.)
/// One `[[route]]`: what requests it matches and what it does with them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("allOf" = [
    { "oneOf": [{ "required": ["path"] }, { "required": ["prefix"] }] },
    { "oneOf": [{ "required": ["upstream"] }, { "required": ["respond"] }] }
]))]
pub struct RawRoute {
    /// Unique name, used in logs, metrics and tests.
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,128}$"))]
    pub name: Spanned<String>,
    /// Host to match: exact (`api.example.com`, `192.0.2.7`, `[2001:db8::1]`) or wildcard suffix
    /// (`*.example.com`). Absent: any host.
    pub host: Option<Spanned<String>>,
    /// Exact path, with optional `{param}` segments: `/orders/{id}`.
    #[schemars(regex(pattern = r"^/"))]
    pub path: Option<Spanned<String>>,
    /// Path prefix, matched on segment boundaries: `/orders` matches `/orders` and `/orders/7`.
    #[schemars(regex(pattern = r"^/[^{}]*$"))]
    pub prefix: Option<Spanned<String>>,
    /// Methods to match (`GET`, `POST`, ...). Absent: every method.
    #[schemars(length(min = 1), inner(regex(pattern = crate::router::methods_pattern())))]
    pub methods: Option<Spanned<Vec<Spanned<String>>>>,
    /// Name of the upstream that serves this route.
    pub upstream: Option<Spanned<String>>,
    /// Answer directly from the gateway instead of proxying.
    pub respond: Option<Box<Spanned<RawRespond>>>,
    /// Prefix removed from the path before it goes upstream.
    pub strip_prefix: Option<Spanned<String>>,
    /// Prefix added to the path (after `strip_prefix`) before it goes upstream.
    pub add_prefix: Option<Spanned<String>>,
    /// Upstream path template, with the route's `{param}` values: `/v2/items/{id}`.
    pub rewrite: Option<Spanned<String>>,
    /// Forward the client's `Host` header (default true); false sends the target's host.
    pub preserve_host: Option<bool>,
    /// Send this `Host` header upstream instead.
    pub host_rewrite: Option<Spanned<String>>,
    /// Rewrite `Location`, `Content-Location` and `Refresh` URLs that name one of the
    /// upstream's targets (or `host_rewrite`) to the client's scheme and `Host`, undoing
    /// `strip_prefix` / `add_prefix` (default true; like nginx's `proxy_redirect default`).
    pub rewrite_location: Option<Spanned<bool>>,
    /// Time allowed for the upstream's response headers; overrides the upstream and gateway default.
    pub timeout: Option<Spanned<DurationText>>,
    /// Time allowed to connect to a target; overrides the upstream's.
    pub connect_timeout: Option<Spanned<DurationText>>,
    /// Time allowed for all attempts together; overrides the upstream's.
    pub total_timeout: Option<Spanned<DurationText>>,
    /// Longest pause between two pieces of the upstream's response body; overrides the gateway
    /// default ("60s"). Then the client's connection is aborted.
    pub read_timeout: Option<Spanned<DurationText>>,
    /// Retries for this route: a number, or a table that overrides the upstream's settings.
    pub retries: Option<Box<Spanned<RawRetries>>>,
    /// Largest request body accepted on this route; larger gets 413. A gRPC call's messages are
    /// held to it one by one, not in total (a stream may carry any number of them).
    pub max_body_size: Option<Spanned<SizeText>>,
    /// Headers set on or removed from the request before it goes upstream.
    pub request_headers: Option<Box<HeaderRules>>,
    /// Headers set on or removed from the response before it goes to the client.
    pub response_headers: Option<Box<HeaderRules>>,
    /// Rhai policy script, relative to the repo root: `"policies/orders.rhai"`.
    pub policy: Option<Spanned<String>>,
    /// Values handed to the policy as the read-only map `req.config`.
    pub policy_config: Option<Box<Spanned<serde_json::Map<String, serde_json::Value>>>>,
    /// CORS: the name of a preset in gateway.toml, or settings of its own.
    pub cors: Option<Box<Spanned<RawCorsRef>>>,
    /// Rate limit for this route; overrides the gateway default (`enabled = false` turns it off).
    pub rate_limit: Option<Box<Spanned<RawRateLimit>>>,
    /// Authentication provider (a name from gateway.toml `[auth.<name>]`).
    pub auth: Option<Spanned<String>>,
    /// Let requests without a token through (a token that is present must still be valid).
    pub auth_optional: Option<bool>,
    /// Serve only requests whose connection presented a client certificate a listener's
    /// `client_auth` verified; others get 403, on every listener (plain ones included).
    pub require_client_cert: Option<Spanned<bool>>,
    /// Proxy WebSocket upgrades (`Upgrade: websocket`) on this route. Default: true, unless the
    /// route's policy defines `on_response` (it could not see or change what the tunnel
    /// carries) or `[defaults] websocket = false`. When false, such a request is forwarded as a
    /// plain request without its upgrade headers.
    pub websocket: Option<bool>,
    /// Longest a WebSocket tunnel may carry no bytes either way before both sides are closed;
    /// overrides the gateway default ("1h").
    pub websocket_idle_timeout: Option<Spanned<DurationText>>,
    /// WASM plugins this route runs after the gateway's `plugins`, in order: after auth, rate
    /// limit, CORS and the policy's `on_request` (docs/plugins.md).
    pub plugins: Option<Vec<Spanned<RawPluginUse>>>,
    /// `false`: this route's requests are never traced (health checks); or
    /// `{ sample_ratio = 0.1, record_query = true }`. Default: `[tracing]`'s settings.
    pub tracing: Option<Spanned<super::raw_tracing::RawRouteTracing>>,
}

/// A direct response.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRespond {
    /// HTTP status code, 200-599.
    #[schemars(range(min = 200, max = 599))]
    pub status: Spanned<u16>,
    /// Response body, sent as written (default: empty).
    #[serde(default)]
    pub body: String,
    /// Response headers: name -> value.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
}

/// Headers to set and to remove. Headers the gateway owns (`Host`, `Content-Length`, hop-by-hop
/// and `X-Forwarded-*`) cannot be named.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderRules {
    /// Header name -> value. A value is a string or a secret reference.
    #[serde(default)]
    pub set: BTreeMap<String, Spanned<ValueSource>>,
    /// Header names to remove.
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}

/// A value written in the repo, or a reference to a secret kept outside it.
#[derive(Debug, Clone, JsonSchema, PartialEq, Eq)]
#[serde(untagged)]
pub enum ValueSource {
    Literal(String),
    Secret(SecretRef),
}

// Deserialised by hand, not `#[serde(untagged)]` (which only drives the schema), so that a
// mistyped reference gets a precise, located error (unknown field `evn`) instead of "data did not
// match any variant of untagged enum ValueSource".
impl<'de> Deserialize<'de> for ValueSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ValueSource;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a string or a secret reference `{ env = \"NAME\" }` / `{ file = \"/path\" }`",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ValueSource, E> {
                Ok(ValueSource::Literal(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ValueSource, A::Error> {
                let t = SecretTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (t.env, t.file) {
                    (Some(var), None) => Ok(ValueSource::Secret(SecretRef::Env(var))),
                    (None, Some(path)) => Ok(ValueSource::Secret(SecretRef::File(path))),
                    _ => Err(de::Error::custom(
                        "a secret reference has exactly one key: `env` or `file`",
                    )),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// The table form of [`ValueSource`], checked for exactly one key after parsing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    env: Option<String>,
    file: Option<String>,
}

/// A secret is never written in the repo: it names where the running gateway finds it.
#[derive(Debug, Clone, JsonSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub enum SecretRef {
    /// Read from this environment variable.
    #[serde(rename = "env")]
    Env(String),
    /// Read from this file (trailing newline trimmed).
    #[serde(rename = "file")]
    File(String),
}

/// `upstreams/*.toml`: `[upstream.<name>]` tables.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamsFile {
    #[serde(default)]
    pub upstream: BTreeMap<String, RawUpstream>,
}

/// A named group of targets that serve the same thing.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// `"http://host:port"` or `{ url = "http://host:port", weight = 2 }`.
    #[schemars(length(min = 1))]
    pub targets: Spanned<Vec<Spanned<RawTarget>>>,
    /// How a target is picked.
    #[serde(default)]
    pub balance: Balance,
    /// Time allowed to connect to a target.
    pub connect_timeout: Option<Spanned<DurationText>>,
    /// Time allowed for the response headers, per attempt.
    pub timeout: Option<Spanned<DurationText>>,
    /// Time allowed for all attempts together (retries and backoff included) until the response
    /// headers arrive. Default: no limit beyond the per-attempt `timeout`s.
    pub total_timeout: Option<Spanned<DurationText>>,
    /// How long an idle pooled connection to a target is kept (default "4s", below common
    /// upstream keep-alive timeouts); a response's `Keep-Alive: timeout=N` cuts it to N-1 s.
    pub idle_timeout: Option<Spanned<DurationText>>,
    /// The request key for `balance = "consistent_hash"`: `client_ip`, `path`,
    /// `header:<name>` or `cookie:<name>`.
    pub hash_key: Option<Spanned<String>>,
    /// When every target is unhealthy or ejected: `true` sends to all of them anyway, `false`
    /// (default) answers 503.
    pub fail_open: Option<bool>,
    /// Active health checks, run in the background against every target.
    pub health: Option<Spanned<RawHealth>>,
    /// Passive outlier detection: targets that keep failing are ejected for a while.
    pub outlier: Option<Spanned<RawOutlier>>,
    /// Retries: how many, on what, with which backoff and budget.
    pub retries: Option<Spanned<RawRetries>>,
    /// Concurrency limits; requests over them get 503 at once.
    pub circuit_breaker: Option<Spanned<RawCircuitBreaker>>,
    /// The HTTP version spoken to the targets (default `"http1"`). `"http2"` is HTTP/2 with prior
    /// knowledge (h2c) on `http://` targets and HTTP/2 negotiated with ALPN on `https://` targets.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// How `https://` targets are verified and what the gateway presents to them.
    pub tls: Option<Spanned<RawUpstreamTls>>,
}

/// The HTTP version spoken to an upstream's targets.
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, connections pooled per worker.
    #[default]
    Http1,
    /// HTTP/2: one connection per target and worker, shared by concurrent requests.
    Http2,
}

/// `tls = { ca_file = "certs/ca.pem", server_name = "orders.internal" }`. There is no setting
/// that turns certificate verification off.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    /// PEM file of the CA certificates that sign the targets' certificates, relative to the repo
    /// root. Default: the operating system's root certificates.
    pub ca_file: Option<Spanned<String>>,
    /// Name sent as SNI and matched against the targets' certificates (default: each target's
    /// host).
    pub server_name: Option<Spanned<String>>,
    /// PEM certificate chain the gateway presents to the targets (mutual TLS), relative to the
    /// repo root. Needs `client_key`.
    pub client_cert_file: Option<Spanned<String>>,
    /// The private key of `client_cert_file`, in PEM: a secret reference
    /// (`{ file = "/run/secrets/orders.key" }` or `{ env = "NAME" }`), never written in the repo.
    pub client_key: Option<Spanned<ValueSource>>,
}

/// `health = { path = "/healthz", interval = "5s" }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// Path requested with GET, e.g. "/healthz".
    pub path: Spanned<String>,
    /// Time between two checks of a target (default "5s").
    pub interval: Option<Spanned<DurationText>>,
    /// Time one check may take (default "2s").
    pub timeout: Option<Spanned<DurationText>>,
    /// Statuses that count as healthy: codes (`200`) or classes (`"2xx"`). Default: 2xx and 3xx.
    pub expect_status: Option<Spanned<Vec<Spanned<StatusPattern>>>>,
    /// Consecutive passing checks that bring an unhealthy target back (default 2); as many
    /// started after a passive ejection end it early.
    pub healthy_after: Option<Spanned<u32>>,
    /// Consecutive failing checks that mark a target unhealthy (default 3).
    pub unhealthy_after: Option<Spanned<u32>>,
    /// `Host` header for the checks (default: the target's host:port).
    pub host: Option<Spanned<String>>,
    /// Whether `healthy_after` passing checks since a passive ejection end it early (default
    /// true, as Envoy's `successful_active_health_check_uneject_host`). `false` for targets
    /// whose check can pass while they fail requests: the ejection then runs its time.
    pub ends_ejections: Option<bool>,
}

/// A status code (`503`) or class (`"5xx"`).
#[derive(Debug, Clone, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(untagged)]
pub enum StatusPattern {
    Code(u16),
    Text(String),
}

/// `outlier = { consecutive_failures = 5 }`. Passive detection is on by default for connection
/// failures; 5xx responses count only when `consecutive_5xx` is set.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    /// Consecutive connect failures, timeouts or resets that eject a target (default 5, 0 = off).
    pub consecutive_failures: Option<Spanned<u32>>,
    /// Consecutive 5xx responses that eject a target (default 0 = off).
    pub consecutive_5xx: Option<Spanned<u32>>,
    /// First ejection time; each further ejection doubles it (default "30s").
    pub base_ejection: Option<Spanned<DurationText>>,
    /// Longest ejection (default "5m").
    pub max_ejection: Option<Spanned<DurationText>>,
    /// Most targets ejected at once, as a share of the upstream (default 50; at least one target
    /// can always be ejected).
    pub max_ejected_percent: Option<Spanned<u32>>,
}

/// Retries: `retries = 2` or `retries = { attempts = 2, on = ["connect_failure", "503"] }`.
#[derive(Debug, Clone, JsonSchema)]
#[serde(untagged)]
pub enum RawRetries {
    Attempts(u32),
    Table(Box<RawRetryTable>),
}

/// The table form of [`RawRetries`].
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetryTable {
    /// Retries after the first attempt (default 1).
    pub attempts: Option<u32>,
    /// What is retried: `connect_failure` (default), `timeout`, `reset`, `5xx`, or status codes
    /// like `"503"`.
    #[schemars(inner(regex(pattern = r"^(connect_failure|timeout|reset|5xx|\+?0*5[0-9]{2})$")))]
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    /// First backoff; doubles with each retry, with jitter (default "25ms").
    pub backoff: Option<Spanned<DurationText>>,
    /// Longest backoff (default "250ms").
    pub max_backoff: Option<Spanned<DurationText>>,
    /// Retry methods that are not idempotent (POST, PATCH) too (default false).
    pub non_idempotent: Option<bool>,
    /// Request bodies up to this size are buffered so that a retry can send them again (default
    /// "64KiB"); larger bodies are streamed and only retried when no byte went upstream.
    pub replay_body_limit: Option<Spanned<SizeText>>,
    /// Upstream only: retries may be at most this percentage of requests (default 20).
    pub budget_percent: Option<Spanned<u32>>,
    /// Upstream only: retries always allowed per second, whatever the budget (default 10).
    pub min_retries_per_second: Option<Spanned<u32>>,
}

impl<'de> Deserialize<'de> for RawRetries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawRetries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of retries or a `{ attempts = N, on = [...] }` table")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawRetries, E> {
                u32::try_from(v)
                    .map(RawRetries::Attempts)
                    .map_err(|_| E::custom(format!("retries must be between 0 and 10, not {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawRetries, E> {
                u32::try_from(v)
                    .map(RawRetries::Attempts)
                    .map_err(|_| E::custom(format!("retries must be between 0 and 10, not {v}")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawRetries, A::Error> {
                RawRetryTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| RawRetries::Table(Box::new(t)))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `circuit_breaker = { max_requests = 1000, max_pending = 100 }`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    /// Most requests in flight to the upstream at once, all gateway workers together.
    pub max_requests: Option<Spanned<u32>>,
    /// Most requests waiting for a new connection to the upstream at once.
    pub max_pending: Option<Spanned<u32>>,
}

/// What the schema checks of a target URL: its scheme (`http` or `https`, in any case).
const TARGET_URL_PATTERN: &str = "^[Hh][Tt][Tt][Pp][Ss]?://";

/// A target: `"http://host:port"` or `{ url = "http://host:port", weight = 2 }`.
#[derive(Debug, Clone, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum RawTarget {
    Url(#[schemars(regex(pattern = TARGET_URL_PATTERN))] String),
    Weighted {
        #[schemars(regex(pattern = TARGET_URL_PATTERN))]
        url: String,
        /// Share of requests relative to the other targets (1-1000, default 1).
        #[serde(default = "default_weight")]
        #[schemars(range(min = 1, max = 1000))]
        weight: u32,
    },
}

/// The table form of [`RawTarget`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightedTarget {
    url: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

// Deserialised by hand, not `#[serde(untagged)]` (which only drives the schema): an untagged
// enum accepts unknown keys in the table form (`wieght = 2` silently meant weight 1) and replaces
// the real error with "data did not match any variant".
impl<'de> Deserialize<'de> for RawTarget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTarget;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a target URL string or a `{ url = \"...\", weight = N }` table")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTarget, E> {
                Ok(RawTarget::Url(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawTarget, A::Error> {
                let WeightedTarget { url, weight } =
                    WeightedTarget::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawTarget::Weighted { url, weight })
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round-robin.
    #[default]
    RoundRobin,
    /// The target with the fewest requests in flight (relative to its weight).
    LeastConnections,
    /// Two targets drawn at random (by weight); the one with fewer requests in flight.
    RandomTwoChoices,
    /// A hash ring on `hash_key`: the same key goes to the same target while it is available.
    ConsistentHash,
}

/// CORS settings.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    /// `"https://app.example.com"`, `"https://*.example.com"` (subdomains, that scheme only;
    /// `"*.example.com"` is https only), or `"*"` for any origin.
    pub allow_origins: Vec<String>,
    /// Methods allowed cross-origin (default: GET, HEAD, POST); `"*"` for any (not with
    /// `allow_credentials`).
    pub allow_methods: Option<Vec<String>>,
    /// Request headers allowed (default, or `"*"`: whatever the preflight asks for; `"*"` not
    /// with `allow_credentials`).
    pub allow_headers: Option<Vec<String>>,
    /// Response headers the browser may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Allow cookies and credentials (never together with `"*"`).
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long browsers may cache a preflight.
    pub max_age: Option<DurationText>,
}

/// A route's CORS: a preset name, or settings of its own.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum RawCorsRef {
    Preset(String),
    Inline(RawCors),
}

/// A rate limit.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Requests allowed per `per`.
    #[schemars(range(min = 1))]
    pub requests: Option<u32>,
    /// The window, e.g. "1m".
    pub per: Option<DurationText>,
    /// Requests allowed at once after a quiet period (default: `requests`).
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
    /// `client_ip` (default), `route`, `header:<name>` or `claim:<name>`. A request without the
    /// header or claim counts by its client address.
    #[schemars(regex(
        pattern = r"^(client_ip|route|header:\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+\s*|claim:.*\S.*)$"
    ))]
    pub key: Option<String>,
    /// `false` turns the limit off. On a route: the gateway default, for this route. In
    /// gateway.toml's `[rate_limit]`: the default, for every route that does not give its own
    /// `requests` or `per` (a route that does keeps its limit).
    pub enabled: Option<bool>,
    /// Where the buckets live: `"local"` (default, in this process) or `"redis"` (shared by
    /// every replica through `[rate_limit_store]`).
    pub store: Option<RawLimitStore>,
    /// IPv6 clients are counted by this prefix length (default 64: one bucket per /64; 128
    /// counts each address).
    #[schemars(range(min = 1, max = 128))]
    pub ipv6_prefix: Option<u8>,
}

/// Where a rate limit's buckets live.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawLimitStore {
    /// In this process: each replica limits on its own.
    Local,
    /// In `[rate_limit_store]`: the limit holds for the whole fleet.
    Redis,
}

/// `[rate_limit_store]` in gateway.toml.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimitStore {
    /// `redis://host:6379/0`, `rediss://` for TLS, or `redis+unix:///run/redis/redis.sock` for
    /// a Unix socket (also `valkey://`, `valkeys://`, `valkey+unix://`, `unix://`); a string or
    /// a secret reference `{ env = "REDIS_URL" }`. No password in it: use `password`.
    pub url: Spanned<ValueSource>,
    /// The ACL user, if any: a string or a secret reference.
    pub username: Option<Spanned<ValueSource>>,
    /// The password: a secret reference, never a literal.
    pub password: Option<Spanned<ValueSource>>,
    /// Time one check may wait for the store (default "25ms"); past it `on_store_error`
    /// applies.
    pub timeout: Option<Spanned<DurationText>>,
    /// What a check does when the store fails or times out: `allow`, `deny`, or `local`
    /// (default: this replica's in-process limit at `requests ÷ expected_replicas`).
    #[serde(default)]
    pub on_store_error: RawOnStoreError,
    /// Replicas sharing the store (default 1), for the `local` fallback.
    pub expected_replicas: Option<Spanned<u32>>,
    /// Prefix of every key and channel (default "rustygate:"); fleets sharing one Redis use
    /// different prefixes.
    pub key_prefix: Option<Spanned<String>>,
}

/// `on_store_error`
#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawOnStoreError {
    /// The request passes.
    Allow,
    /// The request is answered 429 with `Retry-After: 1`.
    Deny,
    /// This replica's in-process limit at `requests ÷ expected_replicas` decides.
    #[default]
    Local,
}

/// `[auth.<name>]`: a JWT provider.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAuthProvider {
    /// Only `"jwt"` for now.
    #[serde(rename = "type")]
    pub kind: String,
    /// Accepted algorithms (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA); the
    /// token's own `alg` is only accepted if listed here.
    pub algorithms: Vec<String>,
    /// HMAC secret for HS* algorithms: a secret reference, never a literal.
    pub secret: Option<Spanned<ValueSource>>,
    /// PEM public key (RSA, EC or Ed25519): a secret reference or a file.
    pub public_key_pem: Option<Spanned<ValueSource>>,
    /// URL of a JWKS document with the signing keys (`https://`; plain `http://` only to a
    /// loopback host, else `validate` warns).
    pub jwks_url: Option<Spanned<String>>,
    /// How long fetched keys are used before a background refresh (default "10m").
    pub jwks_ttl: Option<DurationText>,
    /// Least time between two fetches triggered by unknown key ids, or by a signature the
    /// cached key for a known id does not verify (default "30s").
    pub jwks_min_refresh: Option<DurationText>,
    /// Accepted `iss` values.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted `aud` values.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (default "30s").
    pub leeway: Option<DurationText>,
    /// Refuse tokens without `exp` (default true).
    pub require_exp: Option<bool>,
    /// Claims that must be present.
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Claim checks; failing one is 403.
    #[serde(default)]
    pub claim_rules: Vec<RawClaimRule>,
    /// Where the token is read: `"bearer"` (default), `"header:<name>"`, `"query:<name>"`, `"cookie:<name>"`.
    pub token: Option<Spanned<String>>,
    /// Claim → upstream header. On a route with this provider the client's headers of these
    /// names are always removed; the header is set only from a verified claim (absent claim:
    /// no header; an object, array or control characters: the request is refused with 401).
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Pass the token to the upstream (default false: removed from the header, cookie or query
    /// parameter it was found in).
    pub forward_token: Option<bool>,
}

/// A claim check: `{ claim = "scope", contains = "orders:read" }` or `{ claim = "tenant", equals = "acme" }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClaimRule {
    pub claim: String,
    pub equals: Option<String>,
    pub contains: Option<String>,
}
