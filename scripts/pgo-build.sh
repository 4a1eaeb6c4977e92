#!/usr/bin/env bash
# Profile-guided release build of the gateway (docs/performance.md, "Profile-guided build").
#
#   scripts/pgo-build.sh [cargo build options]   e.g. --locked --target x86_64-unknown-linux-musl
#
# PGO_CARGO: the build command (default `cargo build`; release.yml: `cargo zigbuild`).
# PGO_RUN: a command the instrumented gateways run under, for a binary this machine cannot run
# itself (release.yml's aarch64 build on an x86-64 runner: `qemu-aarch64-static`).
# PGO_CLEAN=1: the instrumented build's target dir is removed once trained (CI's disk).
# PGO_STOP=profile: stop once the profile is merged, without the optimised build; the trained
# instrumented binary stays in target/pgo/target (CI: the build, the training and the profile
# are checked in half the time; the Dockerfile and release.yml do the whole build).
# A build that compiles OpenSSL from source (git2's `vendored-openssl`, the musl builds) does
# it once: the optimised build links the instrumented build's (C code takes no Rust profile).
# PGO_LOAD_TIMEOUT: seconds each training load may take (default 300): a stall fails the build.
#
# 1. builds an instrumented binary (-Cprofile-generate) in target/pgo/target;
# 2. trains it on loopback: one instrumented gateway answers as the upstream, another proxies
#    to it, and h2load sends it HTTP/1.1 GETs and POSTs, h2c streams, HTTPS (HTTP/1.1 and h2,
#    and new TLS connections), requests through JWT auth (HS256, and RS256 with keys from a
#    JWKS), a rate limit and CORS, through a policy, through the example WASM plugin,
#    gRPC-shaped streams to an HTTP/2 upstream, requests to an upstream over TLS with a client
#    certificate, requests retried after a refused connection, requests no route matches and
#    admin API scrapes; where python3 has `websockets`, a WebSocket client exchanges messages
#    through it with an echo server; where redis-server is installed, requests through rate
#    limits kept in Redis (under and over the limit); a third gateway with tracing on (one
#    request in ten sampled, and a route recording every request) exports its spans over
#    OTLP/HTTP to the upstream gateway (bounded counts, 127.0.0.1 only);
# 3. merges the profiles (llvm-profdata from the toolchain's llvm-tools component);
# 4. builds the release binary with them (-Cprofile-use) where cargo always puts it
#    (target/[TRIPLE/]release/rustygate).
#
# The profile lays out hot code together and the request path's branches as they are taken:
# the proxy's code no longer misses the instruction cache as often (see the doc).
# needs: h2load (Debian: nghttp2-client), curl, openssl, `rustup component add llvm-tools`;
# python3 with websockets (Debian: python3-websockets) for the WebSocket training and
# redis-server for the Redis rate limits; each is skipped with a warning without them.
set -euo pipefail
cd "$(dirname "$0")/.."
read -r -a build <<<"${PGO_CARGO:-cargo build}"
read -r -a run <<<"${PGO_RUN:-}"
root=$PWD
pgo="$root/target/pgo"

triple=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --target) triple=${args[i + 1]} ;;
    --target=*) triple=${args[i]#--target=} ;;
  esac
done

sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata=${LLVM_PROFDATA:-$sysroot/lib/rustlib/$host/bin/llvm-profdata}
if [ ! -x "$profdata" ]; then
  echo "pgo-build: no llvm-profdata at $profdata: run \`rustup component add llvm-tools\`" >&2
  exit 2
fi
for tool in h2load curl openssl ${run[0]:+"${run[0]}"}; do
  command -v "$tool" >/dev/null || { echo "pgo-build: needs $tool" >&2; exit 2; }
done

rm -rf "$pgo/raw" "$pgo/train" "$pgo"/*.profdata
mkdir -p "$pgo/raw" "$pgo/train"
# What this run's instrumented build makes is newer than this (the OpenSSL it compiles, below).
touch "$pgo/build-started"
# Under `cargo zigbuild` the instrumented binary links through scripts/pgo-zigcc.sh, which
# passes zig cc the profiler runtime's symbol in a form it takes (see there).
linker=""
if [ "${build[1]:-}" = zigbuild ]; then
  linker="-Clinker=$root/scripts/pgo-zigcc.sh"
  PGO_ZIGCC_LINKER_VAR="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"${triple:-$host}")_LINKER"
  export PGO_ZIGCC_LINKER_VAR
fi
echo "== pgo-build: instrumented build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$pgo/raw $linker" CARGO_TARGET_DIR="$pgo/target" \
  "${build[@]}" --release --bin rustygate "$@"
bin="$pgo/target/${triple:+$triple/}release/rustygate"
# Build scripts and proc macros ran instrumented too: only the gateway's runs count.
rm -f "$pgo/raw"/*.profraw
# The OpenSSL the instrumented build compiled (openssl-src's install, `vendored-openssl`), kept
# for the optimised build: compiling it took 220 of a musl build's ~800 seconds on 2 cores.
rm -rf "$pgo/openssl"
openssl_built=$(find "$pgo/target/${triple:+$triple/}release/build" -maxdepth 4 -type d \
  -path '*/openssl-sys-*/out/openssl-build/install' -newer "$pgo/build-started" 2>/dev/null |
  head -n1)
if [ -n "$openssl_built" ]; then cp -a "$openssl_built" "$pgo/openssl"; fi

echo "== pgo-build: training"
# Code the training never runs is taken as cold and optimised for size: each feature whose
# speed matters is run here (proxying over HTTP/1.1, h2c and TLS, TLS handshakes, bodies,
# auth, rate limits in process and in Redis, CORS, a policy, a WASM plugin, an HTTP/2
# upstream, TLS and client certificates to an upstream, retries, WebSocket tunnels, tracing,
# the access log, 404s, the admin API).
train="$pgo/train"
# Eleven free loopback ports from 19500 up (bash alone: python may be missing).
ports=()
for ((p = 19500; ${#ports[@]} < 11 && p < 20500; p++)); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then ports+=("$p"); fi
done
if [ "${#ports[@]}" -ne 11 ]; then
  echo "pgo-build: no eleven free ports between 19500 and 20499 on 127.0.0.1" >&2
  exit 1
fi
# Nothing listens on $refused_port: the retried upstream's first target.
read -r up_port up_admin gw_port gw_admin tls_port ws_port refused_port redis_port \
  traced_port traced_admin mtls_port <<<"${ports[*]}"
websocket=0
if command -v python3 >/dev/null && python3 -c 'import websockets' 2>/dev/null; then
  websocket=1
else
  echo "pgo-build: warning: no python3 with websockets: WebSocket tunnels are not trained" >&2
fi
redis=0
if command -v redis-server >/dev/null; then
  redis=1
else
  echo "pgo-build: warning: no redis-server: rate limits kept in Redis are not trained" >&2
fi
up="$train/upstream" gw="$train/gateway" traced="$train/traced"
secrets="$train/secrets"
mkdir -p "$up/routes" "$gw/routes" "$gw/upstreams" "$gw/policies" "$gw/certs" "$secrets" \
  "$traced/routes" "$traced/upstreams"
# The upstream also stands in for an OTLP collector: the exporter needs only a 2xx.
cat >"$up/routes/all.toml" <<TOML
[[route]]
name = "hello"
prefix = "/"
respond = { status = 200, body = "hello from the training upstream\n" }

[[route]]
name = "otlp"
prefix = "/v1/traces"
methods = ["POST"]
respond = { status = 200, headers = { "content-type" = "application/x-protobuf" } }
TOML
cat >"$gw/routes/all.toml" <<TOML
[[route]]
name = "api"
prefix = "/api"
upstream = "backend"
max_body_size = "64KiB"

[[route]]
name = "filtered"
prefix = "/filtered"
upstream = "backend"
auth = "train"
cors = "app"
rate_limit = { requests = 1000000000, per = "1s" }

[[route]]
name = "policy"
prefix = "/policy"
upstream = "backend"
policy = "policies/hint.rhai"

[[route]]
name = "grpc"
prefix = "/grpc"
upstream = "h2"

[[route]]
name = "retry"
prefix = "/retry"
upstream = "retried"

[[route]]
name = "jwks"
prefix = "/jwks"
upstream = "backend"
auth = "jwks"

# Over TLS with a client certificate to the mutual-TLS listener, which serves it as /api.
[[route]]
name = "secure"
prefix = "/secure"
upstream = "secure"
strip_prefix = "/secure"
add_prefix = "/api"
TOML
if [ "$websocket" = 1 ]; then
  cat >>"$gw/routes/all.toml" <<TOML

[[route]]
name = "ws"
prefix = "/ws"
upstream = "echo"
TOML
fi
if [ "$redis" = 1 ]; then
  # Under the limit (a Redis round trip per request), and over it (429s answered
  # from the over-limit cache).
  cat >>"$gw/routes/all.toml" <<TOML

[[route]]
name = "shared-limit"
prefix = "/shared"
upstream = "backend"
rate_limit = { requests = 1000000, per = "1s", store = "redis" }

[[route]]
name = "shared-limit-over"
prefix = "/over"
upstream = "backend"
rate_limit = { requests = 1, per = "1h", store = "redis" }
TOML
fi
cat >"$gw/policies/hint.rhai" <<'RHAI'
fn on_request(req) {
    let tenant = req.header("x-tenant");
    if req.header("x-api-version") == "2" && tenant != () {
        req.set_header("x-route-hint", `${tenant}-v2`);
    }
}
RHAI
cat >"$gw/upstreams/backend.toml" <<TOML
[upstream.backend]
targets = ["http://127.0.0.1:$up_port"]

[upstream.h2]
targets = ["http://127.0.0.1:$up_port"]
protocol = "http2"

# Round robin starts every other request on the target that refuses it; the retry goes to the
# other. Not ejected (passive detection off), so that it stays in the rotation.
[upstream.retried]
targets = ["http://127.0.0.1:$refused_port", "http://127.0.0.1:$up_port"]
retries = { attempts = 1, backoff = "1ms", max_backoff = "1ms", budget_percent = 100 }
outlier = { consecutive_failures = 0 }

[upstream.echo]
targets = ["http://127.0.0.1:$ws_port"]

[upstream.secure]
targets = ["https://127.0.0.1:$mtls_port"]
tls = { ca_file = "certs/ca.crt", client_cert_file = "certs/client.crt", client_key = { file = "$secrets/client.key" } }
TOML
# A CA, and the certificates it signs: the TLS listeners' (for 127.0.0.1) and the gateway's
# as a client of the mutual-TLS listener.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
  -subj "/CN=training CA" -keyout "$secrets/ca.key" -out "$secrets/ca.crt" 2>/dev/null
for cert in train client; do
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cert" \
    -keyout "$secrets/$cert.key" -out "$secrets/$cert.csr" 2>/dev/null
  printf 'basicConstraints = CA:FALSE\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n' \
    >"$secrets/$cert.ext"
  openssl x509 -req -days 1 -in "$secrets/$cert.csr" -CA "$secrets/ca.crt" \
    -CAkey "$secrets/ca.key" -CAcreateserial -extfile "$secrets/$cert.ext" \
    -out "$secrets/$cert.crt" 2>/dev/null
done
cp "$secrets/ca.crt" "$secrets/client.crt" "$gw/certs/"
# The JWKS the upstream serves: one RSA key; tokens signed with it (RS256) name it by `kid`.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$secrets/jwks.key" 2>/dev/null
modulus=$(openssl rsa -in "$secrets/jwks.key" -noout -modulus | cut -d= -f2)
server_cert='{ cert = { file = "'"$secrets/train.crt"'" }, key = { file = "'"$secrets/train.key"'" } }'
cat >"$gw/gateway.toml" <<TOML
[[listener]]
name = "tls"
address = "127.0.0.1:$tls_port"
tls = { certificates = [$server_cert] }

[[listener]]
name = "mtls"
address = "127.0.0.1:$mtls_port"
tls = { certificates = [$server_cert], client_auth = { ca = { file = "$secrets/ca.crt" } } }

[auth.train]
type = "jwt"
algorithms = ["HS256"]
secret = { env = "PGO_TRAIN_JWT_SECRET" }
issuers = ["https://train.example"]
audiences = ["train"]
claims_to_headers = { sub = "x-user" }

[auth.jwks]
type = "jwt"
algorithms = ["RS256"]
jwks_url = "http://127.0.0.1:$up_port/jwks.json"
issuers = ["https://train.example"]
audiences = ["train"]

[cors.app]
allow_origins = ["https://app.example.com"]
allow_methods = ["GET", "POST"]
TOML
if [ "$redis" = 1 ]; then
  cat >>"$gw/gateway.toml" <<TOML

[rate_limit_store]
url = "redis://127.0.0.1:$redis_port/"
TOML
fi
# The traced gateway: tracing on, as in production one new trace in ten recorded; one route
# records every request. Its own process, so that the other gateway's profile is that of a
# gateway without tracing (the default).
cat >"$traced/routes/all.toml" <<TOML
[[route]]
name = "api"
prefix = "/api"
upstream = "backend"

[[route]]
name = "recorded"
prefix = "/recorded"
upstream = "backend"
tracing = { sample_ratio = 1.0 }
TOML
cat >"$traced/upstreams/backend.toml" <<TOML
[upstream.backend]
targets = ["http://127.0.0.1:$up_port"]
TOML
cat >"$traced/gateway.toml" <<TOML
[tracing]
endpoint = "http://127.0.0.1:$up_port/v1/traces"
sample_ratio = 0.1
TOML
# The example WASM plugin (proxy-wasm), where the sources have it (the Docker stage copies it).
plugin=examples/plugins/plugins/tag.wasm
if [ -f "$plugin" ]; then
  mkdir -p "$gw/plugins"
  cp "$plugin" "$gw/plugins/tag.wasm"
  cat >>"$gw/gateway.toml" <<TOML

[plugin.tag]
file = "plugins/tag.wasm"
sha256 = "$(sha256sum "$plugin" | cut -d' ' -f1)"
TOML
  cat >>"$gw/routes/all.toml" <<TOML

[[route]]
name = "plugin"
prefix = "/plugin"
upstream = "backend"
plugins = [{ name = "tag", config = { value = "train", deny_body_contains = "DROP TABLE" } }]
TOML
fi
head -c 2048 /dev/zero | tr '\0' 'a' >"$train/body"
# One gRPC message: uncompressed, 5 bytes long.
printf '\x00\x00\x00\x00\x05hello' >"$train/grpc-message"
PGO_TRAIN_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export PGO_TRAIN_JWT_SECRET
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
jwt_head=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
jwt_claims=$(printf '{"sub":"train","iss":"https://train.example","aud":"train","exp":%d}' \
  "$(($(date +%s) + 3600))" | b64url)
jwt_sig=$(printf '%s.%s' "$jwt_head" "$jwt_claims" |
  openssl dgst -sha256 -hmac "$PGO_TRAIN_JWT_SECRET" -binary | b64url)
token="$jwt_head.$jwt_claims.$jwt_sig"
jwks_head=$(printf '{"alg":"RS256","typ":"JWT","kid":"train"}' | b64url)
jwks_sig=$(printf '%s.%s' "$jwks_head" "$jwt_claims" |
  openssl dgst -sha256 -sign "$secrets/jwks.key" -binary | b64url)
jwks_token="$jwks_head.$jwt_claims.$jwks_sig"
# The modulus in hex to bytes: each pair as a \xHH escape.
# shellcheck disable=SC2001 # bash's ${var//} has no pattern for "each two characters"
jwks_n=$(printf '%b' "$(sed 's/../\\x&/g' <<<"$modulus")" | b64url)
cat >>"$up/routes/all.toml" <<TOML

[[route]]
name = "jwks"
prefix = "/jwks.json"
respond = { status = 200, headers = { "content-type" = "application/json" }, body = '{"keys":[{"kty":"RSA","kid":"train","alg":"RS256","use":"sig","n":"$jwks_n","e":"AQAB"}]}' }
TOML

pids=()
stop() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop EXIT
# listening PORT WHAT LOG: waits up to 30 s for a listener on 127.0.0.1:PORT; stops the build
# with LOG's tail if none comes.
listening() {
  for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "pgo-build: $2 did not listen on 127.0.0.1:$1; its log:" >&2
  tail -n 20 "$3" >&2
  exit 1
}
if [ "$redis" = 1 ]; then
  redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
    >"$train/redis.log" 2>&1 &
  pids+=($!)
  listening "$redis_port" redis-server "$train/redis.log"
fi
"${run[@]}" "$bin" serve --repo "$up" --listen "127.0.0.1:$up_port" \
  --admin-listen "127.0.0.1:$up_admin" \
  --workers 1 --cache-dir "$train/cache-upstream" --access-log false 2>"$train/upstream.log" &
pids+=($!)
"${run[@]}" "$bin" serve --repo "$gw" --listen "127.0.0.1:$gw_port" \
  --admin-listen "127.0.0.1:$gw_admin" \
  --workers 1 --cache-dir "$train/cache-gateway" --secret-root "$secrets" \
  2>"$train/gateway.log" >/dev/null &
pids+=($!)
"${run[@]}" "$bin" serve --repo "$traced" --listen "127.0.0.1:$traced_port" \
  --admin-listen "127.0.0.1:$traced_admin" --workers 1 --cache-dir "$train/cache-traced" \
  2>"$train/traced.log" >/dev/null &
pids+=($!)
if [ "$websocket" = 1 ]; then
  # The WebSocket upstream: echoes every message.
  python3 - "$ws_port" 2>"$train/ws-echo.log" <<'PY' &
import asyncio, sys, websockets
async def echo(ws, *_):
    async for message in ws:
        await ws.send(message)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None):
        await asyncio.Future()
asyncio.run(main())
PY
  pids+=($!)
  listening "$ws_port" "the WebSocket echo server" "$train/ws-echo.log"
fi
url="http://127.0.0.1:$gw_port"
traced_url="http://127.0.0.1:$traced_port"
for u in "$url" "$traced_url"; do
  for _ in $(seq 300); do
    curl -fs --max-time 2 -o /dev/null "$u/api/ready" && break
    sleep 0.1
  done
  if ! curl -fsS --max-time 2 -o /dev/null "$u/api/ready"; then
    tail -n 20 "$train/upstream.log" "$train/gateway.log" "$train/traced.log" >&2
    exit 1
  fi
done
# counted ADMIN_PORT METRIC_LINE_START: the sum of the metric's samples (0 when absent); fails,
# saying so, when the admin listener does not answer (a check must not pass on no data).
counted() {
  local metrics
  metrics=$(curl -fsS --max-time 10 "http://127.0.0.1:$1/metrics") ||
    { echo "pgo-build: no metrics from the admin listener on 127.0.0.1:$1" >&2; return 1; }
  awk -v m="$2" 'index($0, m) == 1 { n += $NF } END { print n + 0 }' <<<"$metrics"
}
# load WHAT 2xx|4xx H2LOAD_ARGS...: fails unless every request got the expected class of status
# (a training that ran into 401s or 500s would profile the wrong code), or when it takes over
# $PGO_LOAD_TIMEOUT seconds (a stalled gateway must not hang a CI run or an image build).
load() {
  local what=$1 expect=$2
  shift 2
  timeout "${PGO_LOAD_TIMEOUT:-300}" h2load -t 1 "$@" | awk -v w="$what" -v e="$expect" '
    /^requests:/ { print "  " w ": " $0; ok = (($8 == $2) == (e == "2xx")) }
    /^status codes:/ { print "  " w ": " $0 }
    END { if (!ok) print "pgo-build: " w ": not every request got " e > "/dev/stderr"; exit !ok }'
}
load "HTTP/1.1 GET" 2xx --h1 -n 100000 -c 32 "$url/api/get"
load "HTTP/1.1 POST" 2xx --h1 -n 20000 -c 16 -d "$train/body" "$url/api/post"
load "h2c" 2xx -n 20000 -c 8 -m 10 "$url/api/h2c"
load "JWT, rate limit, CORS" 2xx --h1 -n 20000 -c 16 -H "authorization: Bearer $token" \
  -H "origin: https://app.example.com" "$url/filtered/get"
load "policy" 2xx --h1 -n 20000 -c 16 -H "x-tenant: acme" -H "x-api-version: 2" "$url/policy/get"
load "TLS HTTP/1.1" 2xx --h1 -n 10000 -c 8 "https://127.0.0.1:$tls_port/api/tls"
load "TLS h2" 2xx -n 10000 -c 8 -m 10 "https://127.0.0.1:$tls_port/api/tls"
if [ -f "$plugin" ]; then
  load "WASM plugin" 2xx --h1 -n 20000 -c 16 "$url/plugin/get"
  load "WASM plugin, body" 2xx --h1 -n 5000 -c 8 -d "$train/body" "$url/plugin/post"
fi
load "HTTP/2 upstream, gRPC" 2xx -n 20000 -c 8 -m 10 -H "content-type: application/grpc" \
  -H "te: trailers" -d "$train/grpc-message" "$url/grpc/train.Echo/Call"
load "retry after a refused connection" 2xx --h1 -n 10000 -c 8 "$url/retry/get"
load "JWT from a JWKS (RS256)" 2xx --h1 -n 10000 -c 8 -H "authorization: Bearer $jwks_token" \
  "$url/jwks/get"
load "TLS and a client certificate to the upstream" 2xx --h1 -n 10000 -c 8 "$url/secure/get"
# New TLS connections: one request each, 100 opened every 0.1 s.
load "TLS handshakes" 2xx --h1 -n 2000 -c 2000 -r 100 --rate-period 100ms \
  "https://127.0.0.1:$tls_port/api/tls"
load "admin API" 2xx --h1 -n 2000 -c 2 "http://127.0.0.1:$gw_admin/metrics"
if [ "$websocket" = 1 ]; then
  # 8 connections, 2,000 messages each (text and binary, 64 B to 4 KiB), every echo checked.
  timeout "${PGO_LOAD_TIMEOUT:-300}" python3 - "ws://127.0.0.1:$gw_port/ws" <<'PY'
import asyncio, sys, websockets
async def client(url):
    async with websockets.connect(url, compression=None) as ws:
        for i in range(2000):
            message = "x" * 64 if i % 2 else bytes(4096 if i % 10 == 0 else 512)
            await ws.send(message)
            if await ws.recv() != message:
                raise SystemExit("pgo-build: WebSocket: an echo differs from its message")
async def main():
    await asyncio.gather(*(client(sys.argv[1]) for _ in range(8)))
    print("  WebSocket: 8 connections, 16000 messages echoed")
asyncio.run(main())
PY
fi
if [ "$redis" = 1 ]; then
  load "rate limit in Redis" 2xx --h1 -n 20000 -c 16 "$url/shared/get"
  # The limit's one request, then 429s.
  curl -fs --max-time 10 -o /dev/null "$url/over/get"
  load "over a rate limit in Redis" 4xx --h1 -n 5000 -c 8 "$url/over/get"
  # Requests Redis did not answer were decided without it (the local fallback), not the
  # path being trained.
  store_errors=$(counted "$gw_admin" rustygate_rate_limit_store_errors_total)
  if [ "$store_errors" != 0 ]; then
    echo "pgo-build: $store_errors rate limit check(s) went without Redis; its log:" >&2
    tail -n 20 "$train/redis.log" "$train/gateway.log" >&2
    exit 1
  fi
fi
# Tracing: new traces (one in ten recorded), traces continued from a client's traceparent,
# and a route that records every request; the spans go to the upstream gateway.
load "tracing" 2xx --h1 -n 10000 -c 16 "$traced_url/api/get"
load "tracing, traceparent" 2xx --h1 -n 10000 -c 16 \
  -H "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" "$traced_url/api/get"
load "tracing, every request recorded" 2xx --h1 -n 10000 -c 8 "$traced_url/recorded/get"
export_failed=$(counted "$traced_admin" 'rustygate_trace_spans_dropped_total{reason="export_failed"}')
exports=$(counted "$up_admin" 'rustygate_requests_total{method="POST",route="otlp",status="200"}')
if [ "$export_failed" != 0 ] || [ "$exports" = 0 ]; then
  echo "pgo-build: tracing: $exports export(s) received, $export_failed span(s) not exported; the logs:" >&2
  tail -n 20 "$train/traced.log" "$train/upstream.log" >&2
  exit 1
fi
echo "  tracing: $exports span batches exported"
# No route: 404s.
load "404" 4xx --h1 -n 5000 -c 8 "$url/missing"
curl -fs --max-time 10 -o /dev/null "http://127.0.0.1:$gw_admin/metrics"
# SIGTERM: a gateway that exits writes its profile.
stop
trap - EXIT

echo "== pgo-build: merging $(find "$pgo/raw" -name '*.profraw' | wc -l) profile(s)"
"$profdata" merge -o "$pgo/merged.profdata" "$pgo/raw"
# Named by its content: cargo tells builds apart by their flags, not by the files they name, so
# a new profile under the old name would leave every crate built with the old one.
profile="$pgo/profile-$(sha256sum "$pgo/merged.profdata" | cut -c1-16).profdata"
mv "$pgo/merged.profdata" "$profile"
if [ "${PGO_STOP:-}" = profile ]; then
  echo "pgo-build: profile $profile ($(wc -c <"$profile") bytes); stopping there (PGO_STOP=profile): the instrumented binary is $bin"
  exit 0
fi

echo "== pgo-build: optimised build"
if [ "${PGO_CLEAN:-0}" = 1 ]; then rm -rf "$pgo/target"; fi
if [ -d "$pgo/openssl" ]; then
  # openssl-sys links the library in OPENSSL_DIR instead of compiling its vendored copy again.
  echo "pgo-build: linking the OpenSSL built for the instrumented binary ($pgo/openssl)"
  export OPENSSL_NO_VENDOR=1 OPENSSL_STATIC=1 OPENSSL_DIR="$pgo/openssl"
fi
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile" \
  "${build[@]}" --release --bin rustygate "$@"
