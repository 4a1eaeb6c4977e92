#!/usr/bin/env bash
# The plugin route against the plain one on the same gateway process (issue #16: ≥ 0.85): one
# config with `/t` through the example WASM plugin (examples/plugins) and `/` plain, both to an
# nginx backend; wrk alternates the two paths, round after round, so that machine drift hits
# both alike. Per round: each path's throughput, and the gateway's CPU time per request (user and
# system, from /proc: steadier than throughput on a busy host). Prints the median ratios.
#
# usage: bench/plugin-ratio.sh [--rounds N] [--duration S] [--conns N]
#   The binary: $RUSTYGATE_BIN, else the release build in $CARGO_TARGET_DIR (or ./target).
# needs: nginx and wrk (Debian: apt-get install -y nginx-light wrk), curl
set -euo pipefail

rounds=5 duration=5 conns=32
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    *) echo "plugin-ratio.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "plugin-ratio.sh: needs nginx and wrk" >&2; exit 2; }
here="$(cd "$(dirname "$0")" && pwd)"
bin=${RUSTYGATE_BIN:-${CARGO_TARGET_DIR:-$here/../target}/release/rustygate}
backend_port=19011 port=18090 admin_port=18091

dir=$(mktemp -d)
gw=
cleanup() {
  [[ -n $gw ]] && kill "$gw" 2>/dev/null || true
  [[ -f $dir/backend.pid ]] && kill "$(cat "$dir/backend.pid")" 2>/dev/null || true
  sleep 0.3; rm -rf "$dir"
}
trap cleanup EXIT

# shellcheck source=bench/backend.sh
. "$here/backend.sh"
backend_conf "$dir" "$backend_port"
# nginx's daemon keeps no descriptor of ours open.
nginx -c "$dir/backend.conf" </dev/null >/dev/null 2>&1

repo="$dir/repo"
mkdir -p "$repo/routes" "$repo/upstreams" "$repo/plugins"
cp "$here/../examples/plugins/plugins/tag.wasm" "$repo/plugins/tag.wasm"
sed -n '/^\[plugin.tag\]/,/^$/p' "$here/../examples/plugins/gateway.toml" >"$repo/gateway.toml"
cat >"$repo/routes/all.toml" <<TOML
[[route]]
name = "tagged"
prefix = "/t"
upstream = "backend"
plugins = [{ name = "tag", config = { value = "bench" } }]

[[route]]
name = "plain"
prefix = "/"
upstream = "backend"
TOML
cat >"$repo/upstreams/backend.toml" <<TOML
[upstream.backend]
targets = ["http://127.0.0.1:$backend_port"]
TOML
"$bin" serve --repo "$repo" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
  --workers 1 --access-log false >"$dir/gateway.log" 2>&1 &
gw=$!
for _ in $(seq 1 300); do
  curl -fs -o /dev/null "http://127.0.0.1:$port/t" && break
  sleep 0.1
done
tag=$(curl -fsi "http://127.0.0.1:$port/t" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-rustygate-plugin" {print $2}')
[[ $tag == bench ]] || { echo "the plugin route did not answer with X-RustyGate-Plugin: bench; the gateway's log:" >&2; tail -n 20 "$dir/gateway.log" >&2; exit 1; }

cpu_ticks() { # user and system clock ticks of all the gateway's threads
  sed 's/.*) //' /proc/"$gw"/task/*/stat | awk '{u += $12; s += $13} END {print u, s}'
}
run() { # path → "rps user_us sys_us" per request
  local before after out
  before=$(cpu_ticks)
  out=$(wrk -t1 -c"$conns" -d"${duration}s" "http://127.0.0.1:$port$1" 2>&1)
  after=$(cpu_ticks)
  awk -v b="$before" -v a="$after" -v hz="$(getconf CLK_TCK)" '
    /requests in/ {n = $1} /Requests\/sec/ {rps = $2}
    END { if (n == 0) { print "wrk completed no request" > "/dev/stderr"; exit 1 }
          split(b, x, " "); split(a, y, " ");
          printf "%s %.2f %.2f\n", rps, (y[1]-x[1]) * 1e6 / hz / n, (y[2]-x[2]) * 1e6 / hz / n }' <<<"$out"
}

wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$port/" >/dev/null
wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$port/t" >/dev/null
printf '%-6s %-34s %-34s %s\n' round "plain /" "plugin /t" "ratio: rps, CPU"
rps_ratios=() cpu_ratios=()
for r in $(seq 1 "$rounds"); do
  read -r p_rps p_user p_sys < <(run /)
  read -r t_rps t_user t_sys < <(run /t)
  rr=$(awk -v a="$t_rps" -v b="$p_rps" 'BEGIN { printf "%.3f", a / b }')
  cr=$(awk -v p="$p_user" -v q="$p_sys" -v t="$t_user" -v s="$t_sys" 'BEGIN { printf "%.3f", (p + q) / (t + s) }')
  rps_ratios+=("$rr") cpu_ratios+=("$cr")
  printf '%-6s %-34s %-34s %s %s\n' "$r" "$p_rps rps, ${p_user}+${p_sys} µs" "$t_rps rps, ${t_user}+${t_sys} µs" "$rr" "$cr"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "median plugin/plain throughput: $(median "${rps_ratios[@]}")"
echo "median plugin/plain by CPU time per request (plain's ÷ the plugin's): $(median "${cpu_ratios[@]}")"
