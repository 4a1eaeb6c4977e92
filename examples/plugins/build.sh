#!/usr/bin/env bash
# Builds the example plugin from source into plugins/tag.wasm and prints its sha256 (the value
# gateway.toml pins). Paths are remapped so that the bytes do not depend on where the repo or
# the cargo registry sit. Needs `rustup target add wasm32-wasip1`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/plugins/tag.wasm}"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
export RUSTFLAGS="--remap-path-prefix=$here/tag=/rustygate-tag --remap-path-prefix=$cargo_home=/cargo"
cargo build --quiet --locked --release --target wasm32-wasip1 --manifest-path "$here/tag/Cargo.toml"
cp "$here/tag/target/wasm32-wasip1/release/rustygate_tag.wasm" "$out"
sha256sum "$out" | cut -d' ' -f1
