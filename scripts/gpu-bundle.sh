#!/usr/bin/env bash
# Makes the bundle scripts/gpu-check.sh runs on a GPU host with no Rust and no network: the
# release binary built with `--features cuda` (target/cuda/release/difflab), libcurand (PyTorch's
# CUDA wheels do not bring it), the golden tensors and the check script.
#
#   source ~/.local/cuda-13/env.sh          # from scripts/cuda-toolkit.sh
#   CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
#   scripts/gpu-bundle.sh [BUNDLE_DIR]      # default gpu-bundle/ (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${1:-gpu-bundle}"
BIN="${BIN:-target/cuda/release/difflab}"
CUDA_HOME="${CUDA_HOME:-$HOME/.local/cuda-13}"
rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/lib"
cp "$BIN" "$BUNDLE/difflab"
cp -L "$CUDA_HOME"/lib64/libcurand.so.10 "$BUNDLE/lib/"
cp -r ../shared/golden "$BUNDLE/golden"
cp scripts/gpu-check.sh "$BUNDLE/"
du -sh "$BUNDLE"
