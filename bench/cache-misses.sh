#!/usr/bin/env bash
# Cache misses per proxied request, simulated by callgrind: what instructions.sh counts, plus
# instruction-cache and data-cache (read and write) misses, the same on a busy machine as on an
# idle one. Under 32 connections a request's own state is no longer in the cache when it is next
# touched, so a change that moves fewer bytes into it shows here before it shows in throughput
# (docs/performance.md, "Fewer copies into cold state").
#
# usage: bench/cache-misses.sh GATEWAY_BINARY [extra `serve` flags]
#   e.g. bench/cache-misses.sh target/x86_64-unknown-linux-musl/release/rustygate --access-log false
#        bench/cache-misses.sh --nginx   (nginx as the proxy instead, as instructions.sh runs it:
#        one process, upstream keep-alive, no access log; the same harness and cache geometry)
# env: REQUESTS (default 20000), CONNS (default 32), PORT (the proxy measured, default 18080),
#   BACKEND_PORT (default 19001), LOAD_TIMEOUT (seconds per load, default 900), KEEP=FILE to
#   keep callgrind's output, TOP=N to list the N functions with the most data-cache read misses
#   of their own. The cache geometry is fixed (32 KiB 8-way I1 and D1, 8 MiB 16-way
#   LL, 64-byte lines) so that figures from different hosts compare; valgrind's own choice
#   follows the host's CPU.
# needs: valgrind, nginx, h2load, curl (Debian: valgrind nginx-light nghttp2-client curl)
#
# Like instructions.sh: a config repo proxying every path to an nginx backend, 1 worker, 2,000
# requests to warm up, the counters zeroed, then REQUESTS requests and a dump. Loopback only.
# Function names come out of a glibc build; a static musl build gives the totals only.
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: bench/cache-misses.sh GATEWAY_BINARY [serve flags] | --nginx" >&2; exit 2; }
bin=$1
shift
proxy=gateway
[[ $bin == --nginx ]] && proxy=nginx
requests=${REQUESTS:-20000} conns=${CONNS:-32} port=${PORT:-18080} backend_port=${BACKEND_PORT:-19001}
for tool in valgrind callgrind_control callgrind_annotate nginx h2load curl; do
  command -v "$tool" >/dev/null || { echo "cache-misses.sh: needs $tool" >&2; exit 2; }
done

dir=$(mktemp -d)
vg=""
cleanup() {
  # CONT: a stopped gateway would keep the TERM pending and outlive the run.
  if [[ -n $vg ]]; then
    kill "$vg" 2>/dev/null || true
    kill -CONT "$vg" 2>/dev/null || true
  fi
  if [[ -f $dir/backend.pid ]]; then kill "$(cat "$dir/backend.pid")" 2>/dev/null || true; fi
  sleep 0.3
  rm -rf "$dir"
}
trap cleanup EXIT

mkdir -p "$dir/repo/routes" "$dir/repo/upstreams"
printf '[[route]]\nname = "all"\nprefix = "/"\nupstream = "backend"\n' >"$dir/repo/routes/all.toml"
printf '[upstream.backend]\ntargets = ["http://127.0.0.1:%s"]\n' "$backend_port" \
  >"$dir/repo/upstreams/backend.toml"
# shellcheck source=bench/backend.sh
. "$(dirname "$0")/backend.sh"
backend_conf "$dir" "$backend_port"
nginx -c "$dir/backend.conf"

if [[ $proxy == nginx ]]; then
  proxy_conf "$dir" "$port" "$backend_port"
  set -- nginx -c "$dir/proxy.conf" -g 'daemon off; master_process off;'
else
  set -- "$bin" serve --repo "$dir/repo" --listen "127.0.0.1:$port" \
    --admin-listen "127.0.0.1:$((port + 1))" --workers 1 --cache-dir "$dir/cache" "$@"
fi
valgrind --tool=callgrind --cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=8388608,16,64 \
  --callgrind-out-file="$dir/cg.out" "$@" >"$dir/$proxy.log" 2>&1 &
vg=$!
up=0
for _ in $(seq 1 600); do
  if curl -fs -o /dev/null "http://127.0.0.1:$port/"; then up=1; break; fi
  kill -0 "$vg" 2>/dev/null || break
  sleep 0.2
done
if [[ $up != 1 ]]; then
  echo "cache-misses.sh: the $proxy did not answer on 127.0.0.1:$port; its log:" >&2
  tail -n 20 "$dir/$proxy.log" >&2
  exit 1
fi
# Bounded in time too: a gateway that stalls under valgrind ends the run, not hangs it.
load() {
  timeout "${LOAD_TIMEOUT:-900}" h2load --h1 -n "$1" -c "$conns" "http://127.0.0.1:$port/" ||
    { echo "cache-misses.sh: $1 requests did not finish within ${LOAD_TIMEOUT:-900} s" >&2; exit 1; }
}
load 2000 >/dev/null
callgrind_control -z "$vg" >/dev/null 2>&1
out=$(load "$requests")
ok=$(awk '/^status codes:/ {print $3}' <<<"$out")
if [[ $ok != "$requests" ]]; then
  echo "cache-misses.sh: $ok of $requests requests got a 2xx" >&2
  exit 1
fi
callgrind_control -d "$vg" >/dev/null 2>&1
kill "$vg"
wait "$vg" 2>/dev/null || true
vg=""
# The dump asked for above (`cg.out.1`); the exit writes its own to `cg.out`.
dump=$(find "$dir" -maxdepth 1 -name 'cg.out.*' | sort | tail -1)
# Totals: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
callgrind_annotate "$dump" | grep 'PROGRAM TOTALS' | head -1 | tr -d , |
  awk -v n="$requests" '{printf "per request: %d instructions, %d instruction-cache misses, %d data-cache read misses, %d data-cache write misses\n", $1/n, $7/n, $9/n, $11/n}'
if [[ ${TOP:-0} -gt 0 ]]; then
  # Each function's own cost (not its callees'), per request, most data-cache read misses
  # first. Read from the dump here: callgrind_annotate 3.19 puts the whole of this dump under
  # `clone` (the worker thread's start), with --inclusive=no too. Names are compressed: the
  # first `fn=(id) name` or `cfn=(id) name` names the id. The line after a `calls=` line is
  # the callee's inclusive cost, counted in the callee's own lines already.
  echo "functions by their own data-cache read misses, per request (glibc builds name them):"
  printf '%9s %9s %7s %7s  %s\n' instr I1miss D1rmiss D1wmiss function
  awk -v n="$requests" '
    function id(s,   m) {
      if (match(s, /^\([0-9]+\)/)) {
        m = substr(s, 2, RLENGTH - 2)
        if (length(s) > RLENGTH + 1) name[m] = substr(s, RLENGTH + 2)
        return name[m]
      }
      return s
    }
    /^fn=/ { fn = id(substr($0, 4)); next }
    /^cfn=/ { id(substr($0, 5)); next }
    /^calls=/ { skip = 1; next }
    /^[0-9+*-]/ {
      if (skip) { skip = 0; next }
      ir[fn] += $2; i1[fn] += $5; d1r[fn] += $6; d1w[fn] += $7
    }
    END { for (f in d1r) printf "%9.1f %9.1f %7.1f %7.1f  %s\n", ir[f] / n, i1[f] / n, d1r[f] / n, d1w[f] / n, substr(f, 1, 120) }
  ' "$dump" | sort -k3,3 -g -r | sed -n "1,${TOP}p" # sed reads to the end: `head` would
  # leave sort writing to a closed pipe, and pipefail would end the script before KEEP.
fi
if [[ -n ${KEEP:-} ]]; then
  cp "$dump" "$KEEP"
  echo "callgrind output kept in $KEEP"
fi
