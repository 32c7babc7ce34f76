#!/usr/bin/env bash
# A CUDA toolkit for building difflab's `cuda` feature where the system has none, assembled
# from NVIDIA's PyPI wheels (no GPU needed to build). Usage:
#
#   scripts/cuda-toolkit.sh [PREFIX]        # default PREFIX: ~/.local/cuda-13
#   source PREFIX/env.sh                     # CUDA_HOME, PATH, LD_LIBRARY_PATH, CUDA_COMPUTE_CAP
#   cargo build --release --features cuda
#
# The version matches the CUDA 13 runtime that PyTorch's wheels bring (13.2), so the PTX that
# candle's kernels are compiled to can be loaded by a CUDA 13 driver. CUDA_COMPUTE_CAP defaults
# to 90 (H100/H200); set it before sourcing env.sh for another GPU (80: A100, 89: L4/L40).
set -euo pipefail
PREFIX="${1:-$HOME/.local/cuda-13}"
VERSION="${CUDA_WHEEL_VERSION:-13.2}"
PY="${PYTHON:-python3}"
mkdir -p "$PREFIX"
if [ ! -x "$PREFIX/venv/bin/pip" ]; then
    "$PY" -m venv "$PREFIX/venv"
fi
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check \
    "nvidia-cuda-nvcc==$VERSION.*" "nvidia-cuda-runtime==$VERSION.*" "nvidia-cuda-nvrtc==$VERSION.*" \
    "nvidia-cuda-crt==$VERSION.*" "nvidia-nvvm==$VERSION.*" "nvidia-cuda-cccl==$VERSION.*" \
    "nvidia-cublas==13.*" "nvidia-curand==10.*"
SITE=$("$PREFIX/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
CU="$SITE/nvidia/cu13"
# one directory tree as nvcc and cudarc expect it: bin/, include/, lib64/ (+ nvvm/)
rm -rf "$PREFIX/bin" "$PREFIX/include" "$PREFIX/lib64" "$PREFIX/nvvm"
mkdir -p "$PREFIX/bin" "$PREFIX/include" "$PREFIX/lib64"
for d in "$CU"/bin/*; do ln -sf "$d" "$PREFIX/bin/"; done
[ -d "$CU/nvvm" ] && ln -sfn "$CU/nvvm" "$PREFIX/nvvm"
for d in "$CU"/include/*; do ln -sf "$d" "$PREFIX/include/"; done
for f in "$CU"/lib/*; do ln -sf "$f" "$PREFIX/lib64/"; done
# unversioned names for the linker (libcublas.so -> libcublas.so.13, ...)
for f in "$PREFIX"/lib64/lib*.so.*; do
    base="${f%%.so.*}.so"
    [ -e "$base" ] || ln -sf "$(basename "$f")" "$base"
done
# libcuda (the driver API) comes with the driver, not the toolkit, and the wheels carry no
# link stub. Where no driver is installed, make one as the toolkit's lib64/stubs/libcuda.so is:
# every cu* entry point of cuda.h, soname libcuda.so.1, so the built binary loads the real
# driver library on a GPU host.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so '; then
    mkdir -p "$PREFIX/lib64/stubs"
    grep -hoE '\bcu[A-Z][A-Za-z0-9_]+' "$CU/include/cuda.h" | sort -u | sed 's/.*/void &(void) {}/' > "$PREFIX/lib64/stubs/libcuda.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$PREFIX/lib64/stubs/libcuda.so" "$PREFIX/lib64/stubs/libcuda.c"
    ln -sf stubs/libcuda.so "$PREFIX/lib64/libcuda.so"
fi
cat > "$PREFIX/env.sh" <<ENV
export CUDA_HOME="$PREFIX"
export CUDA_PATH="$PREFIX"
export PATH="$PREFIX/bin:\$PATH"
export LD_LIBRARY_PATH="$PREFIX/lib64:\${LD_LIBRARY_PATH:-}"
export LIBRARY_PATH="$PREFIX/lib64:\${LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
"$PREFIX/bin/nvcc" --version | tail -2
echo "toolkit ready: source $PREFIX/env.sh"
