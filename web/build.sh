#!/usr/bin/env bash
# Builds the browser client: the wasm (web/src, the crate's client steps) and its bindings in
# web/pkg/, which web/js/paychan.js imports. Installs what it needs when it is missing:
# Debian's clang (secp256k1's C for wasm32), the wasm32 target, and wasm-bindgen-cli at the
# exact version of the `wasm-bindgen` crate (about 3.5 minutes, once).
set -euo pipefail
cd "$(dirname "$0")/.."

WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)

if ! command -v clang >/dev/null 2>&1; then
  echo "==> apt-get install clang" >&2
  apt-get install -y -q --no-install-recommends clang >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends clang >/dev/null; }
fi
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
  echo "==> cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION" >&2
  # Not --locked: its lock file names crate versions the registry mirror may not have.
  cargo install -q wasm-bindgen-cli --version "=$WASM_BINDGEN_VERSION"
fi

cargo build -q -p paychan-web --target wasm32-unknown-unknown --profile wasm
wasm-bindgen --target web --out-dir web/pkg --remove-name-section --remove-producers-section \
  "${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/wasm/paychan_web.wasm"
raw=$(wc -c < web/pkg/paychan_web_bg.wasm)
gz=$(gzip -9 -c web/pkg/paychan_web_bg.wasm | wc -c)
echo "web/pkg: paychan_web_bg.wasm $raw bytes, $gz gzip" >&2
