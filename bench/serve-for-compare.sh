#!/usr/bin/env bash
# Gateway command for ../shared/bench/compare.sh: writes a config repo that proxies every path to
# http://127.0.0.1:$BACKEND_PORT (exported by compare.sh) and serves it on 127.0.0.1:18080.
#   ../shared/bench/compare.sh -- bench/serve-for-compare.sh [extra serve flags]
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
cat >"$repo/upstreams/backend.toml" <<TOML
[upstream.backend]
targets = ["http://127.0.0.1:${BACKEND_PORT:?compare.sh exports BACKEND_PORT}"]
TOML
bin=${RUSTYGATE_BIN:-$(dirname "$0")/../target/release/rustygate}
# No exec: the trap must run to remove the temp repo when the gateway stops.
"$bin" serve --repo "$repo" --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:18081 \
  --workers "${WORKERS:-1}" --access-log "${ACCESS_LOG:-false}" "$@" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid; rm -rf "$repo"' EXIT TERM INT
wait $pid
