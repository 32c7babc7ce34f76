#!/usr/bin/env bash
# The GPU host check, one script: golden checks on CUDA (f32 at the CPU tolerances, bf16 looser),
# then `difflab bench` on the `mid` shape (12 layers, 768 wide, block 1024, GPT-2 vocabulary) for
# the baseline and the differential variant in f32 and bf16: tokens/s, MFU against the chip's
# bf16 peak, and peak GPU memory. Needs nothing but a bundle made by scripts/gpu-bundle.sh (the
# binary built with `--features cuda`, libcurand, the golden tensors) and the host's NVIDIA
# driver and CUDA 13 libraries (PyTorch's wheels bring cublas, cudart, nvrtc). Aims at < 8 min.
#
#   scripts/gpu-check.sh [BUNDLE_DIR] [OUT_DIR]
set -uo pipefail
BUNDLE="${1:-gpu-bundle}"
OUT="${2:-${OUT:-gpu-check-out}}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"   # H200 / H100 SXM, dense bf16
STEPS="${STEPS:-8}"
mkdir -p "$OUT"
BIN="$BUNDLE/difflab"

# CUDA libraries: the bundle's, then PyTorch's (nvidia/cu13/lib in site-packages), then the system's
TORCH_LIBS=$(python3 - <<'PY' 2>/dev/null
import glob, site, os
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for d in glob.glob(os.path.join(root, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(root, "nvidia", "*", "lib")):
        print(d)
PY
)
export LD_LIBRARY_PATH="$BUNDLE/lib:$(echo "$TORCH_LIBS" | paste -sd: -):${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$BIN" --version || { echo "the binary does not start: missing CUDA libraries? ldd says:"; ldd "$BIN" | grep "not found"; exit 1; }

status=0
for dtype in f32 bf16; do
    echo "== golden check, cuda, $dtype"
    timeout 180 "$BIN" golden-check --golden "$BUNDLE/golden" --device cuda --dtype "$dtype" | tee "$OUT/golden-$dtype.json" || status=1
done

# a short real run on the GPU: its progress events must carry the device's memory (gpu_mib)
echo "== train on cuda (built-in corpus, 20 steps)"
timeout 120 "$BIN" train --preset demo --device cuda --max_steps 20 --logging_steps 5 --eval_steps 20 \
    --output_dir "$OUT/train-cuda" > "$OUT/train-cuda.jsonl" 2> "$OUT/train-cuda.err" || status=1
python3 - "$OUT/train-cuda.jsonl" <<'PY' | tee -a "$OUT/summary.txt" || status=1
import json, sys
p = [json.loads(l) for l in open(sys.argv[1]) if '"event":"progress"' in l]
mib = [x.get("gpu_mib") for x in p]
print(f"train on cuda: {len(p)} progress events, gpu_mib {mib}")
sys.exit(0 if p and all(isinstance(m, (int, float)) and m > 0 for m in mib) else 1)
PY

MID="--n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50257 --micro_batch_size 4 --batch_size 8 --steps $STEPS --warmup_steps 3 --rope true --device cuda"
for dtype in f32 bf16; do
    for research in false true; do
        name="mid-research_$research-$dtype"
        echo "== bench $name"
        # peak GPU memory: nvidia-smi sampled every 100 ms while the bench runs
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/$name.mem" &
        smi=$!
        timeout 150 "$BIN" bench $MID --research "$research" --dtype "$dtype" > "$OUT/$name.json" || status=1
        kill "$smi" 2>/dev/null
        python3 - "$OUT/$name.json" "$OUT/$name.mem" "$PEAK_TFLOPS" "$name" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"{sys.argv[4]}: no result ({e})"); sys.exit(0)
mem = [int(x) for x in open(sys.argv[2]).read().split() if x.strip().isdigit()]
mfu = d["achieved_gflops"] / (float(sys.argv[3]) * 1000)
print(f"{sys.argv[4]}: {d['tokens_per_second']:,.0f} tok/s, step {d['step_ms_median']:.0f} ms, MFU vs bf16 peak {mfu:.3f}, "
      f"peak GPU memory {max(mem) if mem else 'n/a'} MiB, loss {d['first_loss']:.3f} -> {d['final_loss']:.3f}")
PY
    done
done
exit $status
