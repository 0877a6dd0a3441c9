#!/usr/bin/env bash
# The linker of the browser client's wasm (.cargo/config.toml): rust-lld, minus the exports
# secp256k1-sys adds for its C library's context allocator (`rustsecp256k1_*`). JavaScript
# never calls them, and exporting them keeps libsecp256k1's context creation alive, and with
# it the 32 KB precomputed signing table (with the `k256` feature nothing in the wasm creates
# a libsecp256k1 context). Every other argument is passed on as rustc wrote it.
set -euo pipefail
lld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/rust-lld"
args=()
skip=false
for arg in "$@"; do
  if $skip; then skip=false; [[ $arg == rustsecp256k1_* ]] || args+=(--export "$arg"); continue; fi
  case $arg in
    --export) skip=true ;;
    --export=rustsecp256k1_*) ;;
    *) args+=("$arg") ;;
  esac
done
exec "$lld" "${args[@]}"
