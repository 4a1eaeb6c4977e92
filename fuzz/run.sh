#!/usr/bin/env bash
# Builds every fuzz target, replays the saved regression inputs, then fuzzes each target for
# SECONDS (one after the other, one core each). Usage: fuzz/run.sh SECONDS [TARGET...]
#
# Needs `cargo install cargo-fuzz`. Works on stable rustc: RUSTC_BOOTSTRAP=1 unlocks the
# nightly-only flags cargo-fuzz passes. SANITIZER=none skips AddressSanitizer (default: address).
# Exits non-zero on the first target that crashes; the input is under fuzz/artifacts/<target>/.
# KEEP_GOING=1 reports failing regression inputs and goes on, and fuzzes in libFuzzer's fork
# mode, which keeps searching after a crash (every crash input lands in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(path_normalize config_compile jwt_token webhook_payload)
fi
sanitizer=${SANITIZER:-address}
keep_going=${KEEP_GOING:-0}
failed=0
started=$(mktemp)
trap 'rm -f "$started"' EXIT
# The same flags for build and run, so `run` does not rebuild.
flags=(-O --codegen-units 16 -s "$sanitizer")
export RUSTC_BOOTSTRAP=1

# Seed corpora: hand-written seeds, and one config repo per example directory.
seed() {
  local t=$1
  mkdir -p "corpus/$t"
  if [ -d "seeds/$t" ]; then
    cp -n "seeds/$t"/* "corpus/$t/" 2>/dev/null || true
  fi
  if [ "$t" = config_compile ]; then
    local dir f name
    for dir in ../examples/*/; do
      name=$(basename "$dir")
      {
        if [ -f "$dir/gateway.toml" ]; then cat "$dir/gateway.toml"; fi
        for f in "$dir"routes/*.toml "$dir"upstreams/*.toml "$dir"policies/*.rhai; do
          [ -f "$f" ] || continue
          printf '\n#>>> %s\n' "${f#"$dir"}"
          cat "$f"
        done
      } > "corpus/$t/example-$name"
    done
  fi
}

cargo fuzz build "${flags[@]}"

for t in "${targets[@]}"; do
  seed "$t"
  dict=()
  if [ -f "dicts/$t.dict" ]; then dict=("-dict=dicts/$t.dict"); fi
  # Every saved crash input must now pass (libFuzzer runs files given as arguments once).
  if compgen -G "regressions/$t/*" >/dev/null; then
    echo "== $t: replaying regressions/$t"
    if ! cargo fuzz run "${flags[@]}" "$t" regressions/"$t"/* -- -runs=1; then
      echo "== $t: a regression input fails" >&2
      failed=1
      [ "$keep_going" = 1 ] || exit 1
    fi
  fi
  mode=()
  if [ "$keep_going" = 1 ]; then
    mode=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
  fi
  echo "== $t: fuzzing for ${seconds}s"
  # One libFuzzer process is one core. (`-jobs=1` would also be one core, but libFuzzer then
  # runs the job in a child process with its output in fuzz-0.log instead of on the terminal.)
  cargo fuzz run "${flags[@]}" "$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 "${dict[@]}" "${mode[@]}" || failed=1
  if [ "$failed" = 1 ] && [ "$keep_going" != 1 ]; then exit 1; fi
done
if [ "$failed" = 1 ] || [ -n "$(find artifacts -type f -newer "$started" 2>/dev/null)" ]; then
  echo "== done: see the failures above and fuzz/artifacts/" >&2
  exit 1
fi
echo "== all targets ran ${seconds}s without a crash"
