#!/usr/bin/env bash
# Copied from the workspace's shared/bench/compare.sh (the project's own benchmark harness), unchanged below this line.
# Side-by-side proxy benchmark on loopback: the same nginx backend, reached directly, through nginx
# as a reverse proxy, and through the gateway under test. Rounds alternate (direct, nginx, gateway)
# so machine drift hits all three alike; quote the median ratio gateway/nginx, not absolute numbers.
#
# usage: compare.sh [options] -- GATEWAY_COMMAND...
#   The gateway command must listen on --port and proxy every path to http://127.0.0.1:$BACKEND_PORT
#   (exported to it as BACKEND_PORT). Example, for a config repo in /tmp/bench-repo:
#     shared/bench/compare.sh -- target/release/rustygate serve --repo /tmp/bench-repo --listen 127.0.0.1:18080 --workers 1
# options:
#   --port N          gateway listen port (default 18080)
#   --path P          request path (default /)
#   --header 'K: V'   extra request header for the gateway rounds and nginx rounds alike (repeatable)
#   --rounds N        alternating rounds (default 5)
#   --duration S      seconds per wrk run (default 5)
#   --conns N         wrk connections (default 32)
#   --workers N       nginx proxy worker processes (default 1; give the gateway the same)
#   --nginx-access-log  nginx proxy writes its default access log to a file (compare with the
#                     gateway's access log on); default: nginx access_log off
# needs: nginx and wrk (Debian: apt-get install -y nginx-light wrk)
set -euo pipefail

port=18080 path=/ rounds=5 duration=5 conns=32 workers=1 nginx_log=off
headers=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --port) port=$2; shift 2 ;;
    --path) path=$2; shift 2 ;;
    --header) headers+=(-H "$2"); shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    --nginx-access-log) nginx_log=on; shift ;;
    --) shift; break ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "compare.sh: give the gateway command after --" >&2; exit 2; }
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "compare.sh: needs nginx and wrk" >&2; exit 2; }

backend_port=19001 nginx_port=19002
export BACKEND_PORT=$backend_port
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [[ -f $dir/backend.pid ]] && kill "$(cat "$dir/backend.pid")" 2>/dev/null || true
  [[ -f $dir/proxy.pid ]] && kill "$(cat "$dir/proxy.pid")" 2>/dev/null || true
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
proxy_log="access_log off;"; [[ $nginx_log == on ]] && proxy_log="access_log $dir/proxy.access.log;"
cat >"$dir/proxy.conf" <<EOF
worker_processes $workers; pid $dir/proxy.pid; error_log $dir/proxy.err; daemon on;
events { worker_connections 4096; }
http { $proxy_log
  upstream be { server 127.0.0.1:$backend_port; keepalive 128; }
  server { listen 127.0.0.1:$nginx_port; keepalive_requests 1000000;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
nginx -c "$dir/backend.conf"
nginx -c "$dir/proxy.conf"
"$@" >"$dir/gateway.log" 2>&1 &
pids+=($!)

wait_port() { for _ in $(seq 1 300); do curl -fs -o /dev/null "http://127.0.0.1:$1$path" "${headers[@]}" && return 0; sleep 0.1; done; return 1; }
wait_port $backend_port || { echo "backend did not start" >&2; exit 1; }
wait_port $nginx_port || { echo "nginx proxy did not start" >&2; exit 1; }
if ! wait_port "$port"; then
  echo "gateway did not answer 2xx on 127.0.0.1:$port$path within 30 s; its log:" >&2
  tail -n 20 "$dir/gateway.log" >&2
  exit 1
fi

run() { # prints "rps p99_ms non2xx"
  local out
  out=$(wrk -t1 -c"$conns" -d"${duration}s" --latency "${headers[@]}" "http://127.0.0.1:$1$path" 2>&1)
  local rps p99 bad
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
  bad=$(awk '/Non-2xx/ {print $5}' <<<"$out"); bad=${bad:-0}
  local errs; errs=$(awk '/Socket errors/ {print $0}' <<<"$out")
  [[ -n $errs ]] && bad="$bad($errs)"
  echo "$rps $p99 $bad"
}

printf '%-6s %-28s %-28s %-28s %s\n' round direct nginx gateway "ratio gw/nginx"
ratios=() gw_rps=() ng_rps=() gw_p99=() ng_p99=()
for r in $(seq 1 "$rounds"); do
  read -r d_rps d_p99 d_bad < <(run $backend_port)
  read -r n_rps n_p99 n_bad < <(run $nginx_port)
  read -r g_rps g_p99 g_bad < <(run "$port")
  ratio=$(awk -v a="$g_rps" -v b="$n_rps" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')
  ratios+=("$ratio"); gw_rps+=("$g_rps"); ng_rps+=("$n_rps"); gw_p99+=("$g_p99"); ng_p99+=("$n_p99")
  printf '%-6s %-28s %-28s %-28s %s\n' "$r" "$d_rps rps p99 ${d_p99}ms" "$n_rps rps p99 ${n_p99}ms" "$g_rps rps p99 ${g_p99}ms bad=$g_bad" "$ratio"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "median gateway rps $(median "${gw_rps[@]}"), nginx rps $(median "${ng_rps[@]}"), gateway p99 $(median "${gw_p99[@]}")ms, nginx p99 $(median "${ng_p99[@]}")ms"
echo "median ratio gateway/nginx throughput: $(median "${ratios[@]}")"
