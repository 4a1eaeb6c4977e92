#!/bin/sh
# The instrumented build's linker when scripts/pgo-build.sh builds with `cargo zigbuild`.
# rustc asks the linker to keep the profiler runtime with `-u __llvm_profile_runtime`; zig cc
# (0.14) takes the symbol for an input file and fails ("unrecognized file extension",
# rust-cross/cargo-zigbuild#315). This passes it as `-Wl,--undefined=SYMBOL` instead and runs
# the linker cargo-zigbuild chose, which it names in $PGO_ZIGCC_LINKER_VAR's variable.
set -eu
var=${PGO_ZIGCC_LINKER_VAR:?scripts/pgo-build.sh sets PGO_ZIGCC_LINKER_VAR}
linker=$(printenv "$var" || true)
if [ -z "$linker" ]; then
  echo "pgo-zigcc: $var names no linker (not run by cargo zigbuild?)" >&2
  exit 2
fi
undefined=0
for arg; do
  shift
  if [ "$undefined" = 1 ]; then
    set -- "$@" "-Wl,--undefined=$arg"
    undefined=0
  elif [ "$arg" = -u ]; then
    undefined=1
  else
    set -- "$@" "$arg"
  fi
done
exec "$linker" "$@"
