#!/usr/bin/env bash
# Gateway command for bench/compare.sh: writes a config repo that proxies every path to
# http://127.0.0.1:$BACKEND_PORT (exported by compare.sh) and serves it on 127.0.0.1:18080.
#   bench/compare.sh -- bench/serve-for-compare.sh [extra serve flags]
# FILTERS=1 puts JWT auth (HS256), a rate limit too high to trigger and CORS on the route; the
# client must then send a token and an Origin, e.g.:
#   export JWT_BENCH_SECRET=$(head -c 32 /dev/urandom | base64)
#   FILTERS=1 bench/compare.sh --header "Authorization: Bearer $(bench/jwt-token.sh)" \
#     --header "Origin: https://app.example.com" -- bench/serve-for-compare.sh
# TARGETS=2 gives the upstream two targets (the backend twice) with health checks every second;
# BALANCE=least_connections (or random_two_choices) picks another balancer.
# POLICY=1 puts the typical policy of issue #4 (bench/typical.rhai) on the route; send the headers
# it reads so its condition holds:
#   POLICY=1 bench/compare.sh --header "x-tenant: acme" --header "x-api-version: 2" \
#     -- bench/serve-for-compare.sh
# PLUGIN=1 puts the example WASM plugin (examples/plugins, proxy-wasm ABI) on the route: it adds
# X-RustyGate-Plugin to every response (issue #16: ratio to plain >= 0.85):
#   PLUGIN=1 bench/compare.sh -- bench/serve-for-compare.sh
# TRACE_RATIO=r turns [tracing] on with sample_ratio r, exporting to $TRACE_ENDPOINT (default
# http://127.0.0.1:4318/v1/traces; bench/otlp-discard.py answers there and drops what it gets):
#   bench/otlp-discard.py & TRACE_RATIO=1 bench/compare.sh -- bench/serve-for-compare.sh
# LIMIT=local puts a rate limit too high to trigger on the route (in-process GCRA, governor);
# LIMIT=redis the same limit with store = "redis", in the Redis at $REDIS_URL (default
# redis://127.0.0.1:6379/; issue #18: ratio to LIMIT=local >= 0.7 on 1 worker):
#   redis-server --port 6379 --save '' --appendonly no &
#   LIMIT=redis bench/compare.sh -- bench/serve-for-compare.sh
# LIMIT_REQUESTS=1 LIMIT_PER=1h makes the limit trigger after one request (a flood of 429s:
# served from the over-limit cache with LIMIT=redis); ON_STORE_ERROR=allow|deny|local sets
# on_store_error (stop Redis to measure it). compare.sh needs 2xx answers: drive those with wrk.
set -euo pipefail
repo=$(mktemp -d)
trap 'rm -rf "$repo"' EXIT
mkdir -p "$repo/routes" "$repo/upstreams"
cat >"$repo/routes/all.toml" <<TOML
[[route]]
name = "all"
prefix = "/"
upstream = "backend"
TOML
if [[ ${FILTERS:-0} == 1 ]]; then
  : "${JWT_BENCH_SECRET:?FILTERS=1 needs JWT_BENCH_SECRET (the HS256 secret the token is signed with)}"
  cat >>"$repo/routes/all.toml" <<TOML
auth = "bench"
cors = "app"
rate_limit = { requests = 1000000000, per = "1s" }
TOML
  cat >"$repo/gateway.toml" <<TOML
[auth.bench]
type = "jwt"
algorithms = ["HS256"]
secret = { env = "JWT_BENCH_SECRET" }
issuers = ["https://bench.example"]
audiences = ["bench"]
claims_to_headers = { sub = "x-user" }

[cors.app]
allow_origins = ["https://app.example.com"]
allow_methods = ["GET", "POST"]
TOML
fi
if [[ -n ${LIMIT:-} ]]; then
  store=""
  # A shared limit counts in microseconds: at most one request a microsecond (validate).
  limit_requests=${LIMIT_REQUESTS:-1000000000}
  if [[ $LIMIT == redis ]]; then
    store=', store = "redis"'
    limit_requests=${LIMIT_REQUESTS:-1000000}
    cat >>"$repo/gateway.toml" <<TOML
[rate_limit_store]
url = "${REDIS_URL:-redis://127.0.0.1:6379/}"
on_store_error = "${ON_STORE_ERROR:-local}"
TOML
  fi
  echo "rate_limit = { requests = ${limit_requests}, per = \"${LIMIT_PER:-1s}\"$store }" >>"$repo/routes/all.toml"
fi
if [[ ${POLICY:-0} == 1 ]]; then
  mkdir -p "$repo/policies"
  echo 'policy = "policies/typical.rhai"' >>"$repo/routes/all.toml"
  cp "$(dirname "$0")/typical.rhai" "$repo/policies/typical.rhai"
fi
if [[ ${PLUGIN:-0} == 1 ]]; then
  mkdir -p "$repo/plugins"
  examples="$(dirname "$0")/../examples/plugins"
  cp "$examples/plugins/tag.wasm" "$repo/plugins/tag.wasm"
  # The [plugin.tag] table as the example pins it (file and sha256).
  sed -n '/^\[plugin.tag\]/,/^$/p' "$examples/gateway.toml" >>"$repo/gateway.toml"
  echo 'plugins = [{ name = "tag", config = { value = "bench" } }]' >>"$repo/routes/all.toml"
fi
if [[ -n ${TRACE_RATIO:-} ]]; then
  cat >>"$repo/gateway.toml" <<TOML
[tracing]
endpoint = "${TRACE_ENDPOINT:-http://127.0.0.1:4318/v1/traces}"
sample_ratio = ${TRACE_RATIO}
TOML
fi
cat >"$repo/upstreams/backend.toml" <<TOML
[upstream.backend]
targets = ["http://127.0.0.1:${BACKEND_PORT:?compare.sh exports BACKEND_PORT}"]
TOML
if [[ ${TARGETS:-1} == 2 ]]; then
  # Two targets (the same backend twice: compare.sh has one) and active health checks.
  cat >"$repo/upstreams/backend.toml" <<TOML
[upstream.backend]
targets = ["http://127.0.0.1:${BACKEND_PORT}", "http://127.0.0.1:${BACKEND_PORT}"]
balance = "${BALANCE:-round_robin}"
health = { path = "/", interval = "1s", timeout = "1s" }
TOML
fi
# The binary: $RUSTYGATE_BIN, else the release build in $CARGO_TARGET_DIR (or ./target).
bin=${RUSTYGATE_BIN:-${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/release/rustygate}
# No exec: the trap must run to remove the temp repo when the gateway stops.
"$bin" serve --repo "$repo" --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:18081 \
  --workers "${WORKERS:-1}" --access-log "${ACCESS_LOG:-false}" "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid; rm -rf "$repo"' EXIT TERM INT
wait $pid
