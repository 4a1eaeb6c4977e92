#!/usr/bin/env bash
# The gateway beside nginx as a proxy, each alone on a core of its own: the proxy under test (all
# its threads) on one CPU, the nginx backend and wrk on another. Rounds alternate nginx and the
# gateway. Per round: throughput, and the proxy's CPU time per request (user and system, from
# /proc), and how idle each CPU was. With a core of its own the proxy is busy most of the round,
# so throughput follows what it costs, not how three processes happened to share two cores (which
# is what moves bench/compare.sh from round to round). Prints the medians and the ratios
# gateway/nginx.
#
# usage: bench/pinned.sh [--rounds N] [--duration S] [--conns N] [-- extra serve flags]
#   The gateway is bench/serve-for-compare.sh's (port 18080, one worker; the binary
#   $RUSTYGATE_BIN, else the release build in $CARGO_TARGET_DIR or ./target); its settings that
#   need no request headers apply (ACCESS_LOG=true, TARGETS=2, PLUGIN=1, ...), to the gateway
#   only.
#   PROXY_CPU (default: the last CPU) and PEER_CPU (default 0) choose the cores.
#   NGINX_FORWARDED=1: nginx sends the upstream the fields the gateway adds by default
#   (X-Forwarded-For, -Proto and -Host, X-Request-Id, the client's Host), so that both proxies
#   do the same work.
# needs: nginx and wrk (Debian: apt-get install -y nginx-light wrk), curl, taskset (util-linux),
# two CPUs or more
set -euo pipefail

rounds=5 duration=5 conns=32
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "pinned.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for tool in nginx wrk curl taskset; do
  command -v "$tool" >/dev/null || { echo "pinned.sh: needs $tool" >&2; exit 2; }
done
cpus=$(nproc)
((cpus >= 2)) || { echo "pinned.sh: needs two CPUs or more (this machine has $cpus)" >&2; exit 2; }
proxy_cpu=${PROXY_CPU:-$((cpus - 1))} peer_cpu=${PEER_CPU:-0}
[[ $proxy_cpu != "$peer_cpu" ]] || { echo "pinned.sh: PROXY_CPU and PEER_CPU must differ" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
backend_port=19021 nginx_port=19022 port=18080

dir=$(mktemp -d)
serve='' gw=''
cleanup() {
  # serve-for-compare.sh stops its gateway and removes its config repo on SIGTERM.
  if [[ -n $serve ]]; then kill -TERM "$serve" 2>/dev/null || true; wait "$serve" 2>/dev/null || true; fi
  for p in backend proxy; do
    if [[ -f $dir/$p.pid ]]; then kill "$(cat "$dir/$p.pid")" 2>/dev/null || true; fi
  done
  sleep 0.3; rm -rf "$dir"
}
trap cleanup EXIT

# shellcheck source=bench/backend.sh
. "$here/backend.sh"
backend_conf "$dir" "$backend_port"
forwarded=
if [[ ${NGINX_FORWARDED:-0} == 1 ]]; then
  # shellcheck disable=SC2016 # nginx's variables, for nginx to expand
  forwarded='proxy_set_header Host $http_host; proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $http_host;
    proxy_set_header X-Request-Id $request_id;'
fi
proxy_conf "$dir" "$nginx_port" "$backend_port" "$forwarded"
# nginx's daemons keep no descriptor of ours open.
nginx -c "$dir/backend.conf" </dev/null >/dev/null 2>&1
nginx -c "$dir/proxy.conf" -g 'daemon on;' </dev/null >/dev/null 2>&1

# Pinned from its start: the gateway and every thread it makes inherit the core.
BACKEND_PORT=$backend_port taskset -c "$proxy_cpu" "$here/serve-for-compare.sh" "$@" \
  >"$dir/gateway.log" 2>&1 &
serve=$!
wait_port() {
  for _ in $(seq 1 300); do curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
  return 1
}
wait_port "$backend_port" || { echo "the backend did not start" >&2; exit 1; }
wait_port "$nginx_port" || { echo "the nginx proxy did not start" >&2; exit 1; }
wait_port "$port" || { echo "the gateway did not answer; its log:" >&2; tail -n 20 "$dir/gateway.log" >&2; exit 1; }
gw=$(pgrep -P "$serve") # serve-for-compare.sh waits on its one child, the gateway

nginx_procs() { # the proxy's master and its worker, one per line
  local master; master=$(cat "$dir/proxy.pid")
  echo "$master"; pgrep -P "$master"
}
mapfile -t proxy_procs < <(nginx_procs)
mapfile -t backend_procs < <(cat "$dir/backend.pid"; pgrep -P "$(cat "$dir/backend.pid")")
pin() { # CPU PID... (every thread of each)
  local cpu=$1 p t; shift
  for p in "$@"; do for t in /proc/"$p"/task/*; do taskset -pc "$cpu" "${t##*/}" >/dev/null; done; done
}
pin "$proxy_cpu" "${proxy_procs[@]}" "$gw"
pin "$peer_cpu" "${backend_procs[@]}"

cpu_ticks() { # user and system clock ticks of every thread of the given processes
  local p
  for p in "$@"; do sed 's/.*) //' /proc/"$p"/task/*/stat; done | awk '{u += $12; s += $13} END {print u, s}'
}
idle_ticks() { # idle ticks of the proxy's CPU and of the peers' CPU
  awk -v a="cpu$proxy_cpu" -v b="cpu$peer_cpu" '$1 == a {x = $5 + $6} $1 == b {y = $5 + $6} END {print x, y}' /proc/stat
}
run() { # port pid... → "rps user_us sys_us proxy_cpu_idle% peer_cpu_idle%" per request
  local port=$1 before after out idle_before idle_after; shift
  idle_before=$(idle_ticks)
  before=$(cpu_ticks "$@")
  out=$(taskset -c "$peer_cpu" wrk -t1 -c"$conns" -d"${duration}s" "http://127.0.0.1:$port/" 2>&1)
  after=$(cpu_ticks "$@")
  idle_after=$(idle_ticks)
  awk -v b="$before" -v a="$after" -v ib="$idle_before" -v ia="$idle_after" -v d="$duration" -v hz="$(getconf CLK_TCK)" '
    /requests in/ {n = $1} /Requests\/sec/ {rps = $2} /Non-2xx/ {bad = $5}
    END { if (n == 0 || bad > 0) { print "wrk: no request completed, or non-2xx answers" > "/dev/stderr"; exit 1 }
          split(b, x, " "); split(a, y, " "); split(ib, i, " "); split(ia, j, " ");
          printf "%s %.2f %.2f %.0f %.0f\n", rps, (y[1]-x[1]) * 1e6 / hz / n, (y[2]-x[2]) * 1e6 / hz / n,
            (j[1]-i[1]) * 100 / hz / d, (j[2]-i[2]) * 100 / hz / d }' <<<"$out"
}

taskset -c "$peer_cpu" wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$nginx_port/" >/dev/null
taskset -c "$peer_cpu" wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$port/" >/dev/null
echo "proxy on CPU $proxy_cpu, backend and wrk on CPU $peer_cpu; CPU time is user+system µs per request"
echo "idle: of the proxy's CPU / of the peers' CPU during the round"
printf '%-6s %-42s %-42s %s\n' round nginx gateway "ratio: rps, CPU"
g_rps=() n_rps=() g_cpu=() n_cpu=() rps_ratios=() cpu_ratios=()
for r in $(seq 1 "$rounds"); do
  read -r nr nu ns ni npi < <(run "$nginx_port" "${proxy_procs[@]}")
  read -r gr gu gs gi gpi < <(run "$port" "$gw")
  rr=$(awk -v a="$gr" -v b="$nr" 'BEGIN { printf "%.3f", a / b }')
  # nginx's CPU per request over the gateway's: above 1 when the gateway costs less.
  cr=$(awk -v p="$nu" -v q="$ns" -v t="$gu" -v s="$gs" 'BEGIN { printf "%.3f", (p + q) / (t + s) }')
  g_rps+=("$gr") n_rps+=("$nr") rps_ratios+=("$rr") cpu_ratios+=("$cr")
  g_cpu+=("$(awk -v a="$gu" -v b="$gs" 'BEGIN { print a + b }')")
  n_cpu+=("$(awk -v a="$nu" -v b="$ns" 'BEGIN { print a + b }')")
  printf '%-6s %-42s %-42s %s %s\n' "$r" "$nr rps, ${nu}+${ns} µs, idle ${ni}/${npi}%" \
    "$gr rps, ${gu}+${gs} µs, idle ${gi}/${gpi}%" "$rr" "$cr"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "median CPU per request: nginx $(median "${n_cpu[@]}") µs, gateway $(median "${g_cpu[@]}") µs"
echo "median throughput: nginx $(median "${n_rps[@]}"), gateway $(median "${g_rps[@]}")"
echo "median ratio gateway/nginx throughput: $(median "${rps_ratios[@]}")"
echo "median ratio by CPU time per request (nginx's ÷ the gateway's): $(median "${cpu_ratios[@]}")"
