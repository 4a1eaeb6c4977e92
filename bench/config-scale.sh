#!/usr/bin/env bash
# Config at scale (issue #14, item 7): how long `validate` takes and how much memory it and `serve`
# need for large route tables, and what a config swap does to requests in flight.
#
#   bench/config-scale.sh [validate] [serve] [swap]      # default: all three
#
# * validate: wall time and peak RSS (`/usr/bin/time`) of `rustygate validate` on generated repos
#   of $SIZES routes (default "10000 100000"), median of $RUNS runs (default 3).
# * serve: resident memory (VmRSS, and the peak VmHWM) of `rustygate serve` once ready, per size.
# * swap: `serve --workers 1` with $SWAP_ROUTES routes (default 10000); wrk -t1 -c32 on a route
#   the gateway answers itself, for $SWAP_SECS s (default 10) without reloads, then as long again
#   while the config is swapped $SWAPS times (default 6, one every second or so). Meanwhile a
#   second wrk keeps 4 requests in flight on a route to a backend that answers after 200 ms, so
#   that at each swap some requests still hold the old snapshot (the worker lets go of it last).
#   Prints the latency percentiles of the fast route for both runs. Every loop is bounded in count
#   and time; traffic stays on loopback (ports $PORT to $PORT+2, default 18090).
#
# The repos come from bench/gen-routes.py (the route mix is described there). The binary is
# $RUSTYGATE_BIN, else the release build in $CARGO_TARGET_DIR (or ./target). Figures in
# bench/README.md, "Config at scale".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${RUSTYGATE_BIN:-${CARGO_TARGET_DIR:-$here/../target}/release/rustygate}
sizes=${SIZES:-10000 100000}
runs=${RUNS:-3}
port=${PORT:-18090}
aport=$((port + 1))
export BENCH_JWT_SECRET=${BENCH_JWT_SECRET:-bench-secret-bench-secret-bench-secret}
export RUSTYGATE_ADMIN_TOKEN=bench-admin-token
modes=${*:-validate serve swap}
[[ -x $bin ]] || { echo "no binary at $bin (cargo build --release, or set RUSTYGATE_BIN)" >&2; exit 2; }

work=$(mktemp -d)
server=
backend=
cleanup() {
  [[ -n $server ]] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
  [[ -n $backend ]] && kill "$backend" 2>/dev/null && wait "$backend" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

repo() { # repo N -> path of a generated repo with N routes (made once per run)
  local dir=$work/r$1
  [[ -d $dir ]] || python3 "$here/gen-routes.py" "$1" "$dir"
  echo "$dir"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# Waits (at most 300 s) until the admin listener answers /readyz, optionally with a version
# other than $2. Prints the version.
wait_ready() {
  local not=${2:-} v
  for _ in $(seq 3000); do
    v=$(curl -sf "http://127.0.0.1:$aport/readyz" 2>/dev/null | awk '{ print $2 }') || true
    if [[ -n $v && $v != "$not" ]]; then echo "$v"; return 0; fi
    kill -0 "$1" 2>/dev/null || { echo "serve exited" >&2; return 1; }
    sleep 0.1
  done
  echo "serve not ready after 300 s" >&2
  return 1
}

start_serve() { # start_serve DIR
  "$bin" serve --repo "$1" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$aport" \
    --workers 1 --access-log false --watch false --log-format json 2>"$work/serve.log" &
  server=$!
}

stop_serve() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=
}

mode_validate() {
  echo "## validate (median of $runs; wall s, peak RSS MiB)"
  for n in $sizes; do
    local dir walls=() rss=()
    dir=$(repo "$n")
    for _ in $(seq "$runs"); do
      /usr/bin/time -f "%e %M" -o "$work/time" "$bin" validate "$dir" 2>"$work/validate.err" ||
        { cat "$work/validate.err" >&2; exit 1; }
      read -r w m <"$work/time"
      walls+=("$w"); rss+=("$m")
    done
    printf '%7d routes: %6.2f s  %7.0f MiB   (runs: %s s)\n' "$n" \
      "$(printf '%s\n' "${walls[@]}" | median)" \
      "$(printf '%s\n' "${rss[@]}" | median | awk '{ print $1 / 1024 }')" "${walls[*]}"
  done
}

mode_serve() {
  echo "## serve, resident once ready (1 worker; MiB)"
  for n in $sizes; do
    local dir
    dir=$(repo "$n")
    start_serve "$dir"
    wait_ready "$server" >/dev/null
    sleep 1
    printf '%7d routes: VmRSS %6.0f MiB  VmHWM %6.0f MiB\n' "$n" \
      "$(awk '/^VmRSS/ { print $2 / 1024 }' "/proc/$server/status")" \
      "$(awk '/^VmHWM/ { print $2 / 1024 }' "/proc/$server/status")"
    stop_serve
  done
}

# The slow backend for the swap benchmark: answers each request after 200 ms, for at most 10 min.
slow_backend() {
  python3 - "$1" <<'PY' &
import asyncio, sys
async def conn(r, w):
    try:
        while True:
            await r.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.2)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    server = await asyncio.start_server(conn, "127.0.0.1", int(sys.argv[1]))
    try:
        await asyncio.wait_for(server.serve_forever(), 600)
    except asyncio.TimeoutError:
        pass
asyncio.run(main())
PY
  backend=$!
}

mode_swap() {
  local n=${SWAP_ROUTES:-10000} secs=${SWAP_SECS:-10} swaps=${SWAPS:-6} dir v slow_pid
  echo "## swap: $n routes, 1 worker, wrk -t1 -c32 -d${secs}s on GET /bench (ms)"
  # A repo of its own: the swaps rewrite it.
  dir=$work/swap$n
  python3 "$here/gen-routes.py" "$n" "$dir"
  slow_backend $((port + 2))
  printf '[upstream.slow]\ntargets = ["http://127.0.0.1:%d"]\n' $((port + 2)) >"$dir/upstreams/zz-slow.toml"
  bench_route() {
    printf '[[route]]\nname = "bench"\npath = "/bench"\nrespond = { status = 200, body = "variant %d" }\n\n' "$1"
    printf '[[route]]\nname = "slow"\npath = "/slow"\nupstream = "slow"\n'
  }
  bench_route 0 >"$dir/routes/zz-bench.toml"
  cat >"$work/pct.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("requests %d  errors %d  p50 %.2f  p99 %.2f  p99.9 %.2f  max %.2f\n",
    summary.requests, summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000))
end
LUA
  start_serve "$dir"
  v=$(wait_ready "$server")
  wrk -t1 -c32 -d2s "http://127.0.0.1:$port/bench" >/dev/null # warm-up
  wrk -t1 -c4 -d"${secs}s" "http://127.0.0.1:$port/slow" >/dev/null &
  slow_pid=$!
  printf 'no swap:  '
  wrk -t1 -c32 -d"${secs}s" -s "$work/pct.lua" "http://127.0.0.1:$port/bench" | tail -1
  wait "$slow_pid"
  wrk -t1 -c4 -d"${secs}s" "http://127.0.0.1:$port/slow" >/dev/null &
  slow_pid=$!
  wrk -t1 -c32 -d"${secs}s" -s "$work/pct.lua" "http://127.0.0.1:$port/bench" >"$work/wrk.out" &
  local wrk_pid=$! done=0 started
  started=$(date +%s)
  sleep 1
  for k in $(seq "$swaps"); do
    (($(date +%s) - started < secs - 1)) || break
    bench_route "$k" >"$dir/routes/zz-bench.toml"
    curl -sf -X POST -H "Authorization: Bearer $RUSTYGATE_ADMIN_TOKEN" \
      "http://127.0.0.1:$aport/admin/reload" >/dev/null
    v=$(wait_ready "$server" "$v") && done=$((done + 1))
    sleep 0.5
  done
  wait "$wrk_pid" "$slow_pid"
  printf 'swapping: %s  (%d swaps)\n' "$(tail -1 "$work/wrk.out")" "$done"
  stop_serve
  kill "$backend" 2>/dev/null || true
  wait "$backend" 2>/dev/null || true
  backend=
}

echo "# $("$bin" --version 2>/dev/null || echo rustygate) ($bin), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for m in $modes; do
  case $m in
    validate) mode_validate ;;
    serve) mode_serve ;;
    swap) mode_swap ;;
    *) echo "unknown mode $m (validate, serve, swap)" >&2; exit 2 ;;
  esac
done
