#!/usr/bin/env bash
# Copied from the workspace's shared/bench/instructions.sh (the project's own benchmark harness), unchanged below this line.
# User-space instructions per proxied request, gateway vs nginx, counted by callgrind: the same
# figure on a busy machine as on an idle one, so a change of a few percent is visible where
# compare.sh's throughput is too noisy. Lower is better; the ratio gateway/nginx is what to quote.
#
# usage: instructions.sh [options] -- GATEWAY_COMMAND...
#   The gateway command must listen on --port and proxy every path to http://127.0.0.1:$BACKEND_PORT
#   (exported to it as BACKEND_PORT); it is started under valgrind, so give the binary itself,
#   not a wrapper script (no `bench/serve-for-compare.sh`; write the config repo first).
# options:
#   --port N        gateway listen port (default 18080)
#   --path P        request path (default /)
#   --header 'K: V' extra request header (repeatable)
#   --requests N    requests per measured run (default 20000; two runs, must agree)
#   --conns N       keep-alive connections (default 32)
#   --no-nginx      measure only the gateway
# needs: valgrind, nginx, h2load (Debian: apt-get install -y valgrind nginx-light nghttp2-client)
#
# How: warm up with 2,000 requests, zero the counters, run N requests and dump, run N more and
# dump; each dump / N is one figure. Startup and idle work are excluded by the zeroing. Callgrind
# counts `rep stos/movs` once per byte, so a large memset or memcpy weighs more here than on the CPU:
# look at callgrind_annotate's top functions when a figure moves unexpectedly.
set -euo pipefail

port=18080 path=/ requests=20000 conns=32 nginx=1
headers=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --path) path=$2; shift 2 ;;
    --header) headers+=(-H "$2"); shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --no-nginx) nginx=0; shift ;;
    --) shift; break ;;
    *) echo "instructions.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "instructions.sh: give the gateway command after --" >&2; exit 2; }
for t in valgrind callgrind_control nginx h2load; do
  command -v $t >/dev/null || { echo "instructions.sh: needs $t (apt-get install -y valgrind nginx-light nghttp2-client)" >&2; exit 2; }
done

backend_port=19001 nginx_port=19002
export BACKEND_PORT=$backend_port
dir=$(mktemp -d)
vpid=
cleanup() {
  [[ -n $vpid ]] && kill "$vpid" 2>/dev/null || true
  [[ -f $dir/backend.pid ]] && kill "$(cat "$dir/backend.pid")" 2>/dev/null || true
  sleep 0.3; rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/backend.conf" <<EOF
worker_processes 1; pid $dir/backend.pid; error_log $dir/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$backend_port; keepalive_requests 1000000;
    location / { return 200 "hello from backend\n"; } } }
EOF
cat >"$dir/proxy.conf" <<EOF
worker_processes 1; pid $dir/proxy.pid; error_log $dir/proxy.err;
events { worker_connections 4096; }
http { access_log off;
  upstream be { server 127.0.0.1:$backend_port; keepalive 128; }
  server { listen 127.0.0.1:$nginx_port; keepalive_requests 1000000;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
nginx -c "$dir/backend.conf"

wait_port() { for _ in $(seq 1 600); do curl -fs -o /dev/null "${headers[@]}" "http://127.0.0.1:$1$path" && return 0; sleep 0.2; done; return 1; }
load() { h2load --h1 -n "$2" -c "$conns" -t 1 "${headers[@]}" "http://127.0.0.1:$1$path" | awk '/^requests:/ {print $0}'; }

# measure NAME PORT CMD... -> prints "NAME: X instructions per request (runs A, B)"
measure() {
  local name=$1 p=$2; shift 2
  valgrind --tool=callgrind --callgrind-out-file="$dir/$name.%p.out" "$@" >"$dir/$name.log" 2>&1 &
  vpid=$!
  wait_port "$p" || { echo "$name did not answer on 127.0.0.1:$p$path; its log:" >&2; tail -n 20 "$dir/$name.log" >&2; exit 1; }
  load "$p" 2000 >/dev/null
  callgrind_control -z "$vpid" >/dev/null 2>&1
  local figs=()
  for k in 1 2; do
    local done_line; done_line=$(load "$p" "$requests")
    grep -q " 0 failed" <<<"$done_line" || echo "warning: $name: not every request succeeded: $done_line" >&2
    callgrind_control -d "run$k" "$vpid" >/dev/null 2>&1
    sleep 0.5
    local f; f=$(ls -t "$dir/$name".*.out.* 2>/dev/null | head -n 1)
    local ir; ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
    figs+=("$(awk -v a="$ir" -v n="$requests" 'BEGIN { printf "%.0f", a / n }')")
    rm -f "$f"
  done
  kill -TERM "$vpid" 2>/dev/null || true; wait "$vpid" 2>/dev/null || true; vpid=
  local avg; avg=$(awk -v a="${figs[0]}" -v b="${figs[1]}" 'BEGIN { printf "%.0f", (a + b) / 2 }')
  echo "$name: $avg instructions per request (runs ${figs[0]}, ${figs[1]})"
}

wait_port $backend_port || { echo "backend did not start" >&2; exit 1; }
g=$(measure gateway "$port" "$@"); echo "$g"
if [[ $nginx == 1 ]]; then
  n=$(measure nginx "$nginx_port" nginx -c "$dir/proxy.conf" -g 'daemon off; master_process off;'); echo "$n"
  gi=$(awk '{print $2}' <<<"$g"); ni=$(awk '{print $2}' <<<"$n")
  echo "ratio gateway/nginx instructions per request: $(awk -v a="$gi" -v b="$ni" 'BEGIN { printf "%.2f", a / b }') (lower is better; 1.00 = nginx)"
fi
