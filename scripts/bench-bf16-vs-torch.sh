#!/usr/bin/env bash
# bf16 on the CPU against PyTorch, same machine, same run: PyTorch eager f32, PyTorch bf16
# autocast (bench_train.py --dtype bf16), difflab f32, difflab bf16, in that order, REPS times
# (A B C D A B C D). Needs: cargo build --release; a CPU with AVX512-BF16; a Python with torch
# (see ../shared/bench/README.md), given as TORCH_PYTHON (default ~/venvs/torchref/bin/python).
# Prints one line per measurement (tokens/s, training MiB; difflab also MFU and the in-process
# matmul peak) and a table of medians with each repetition's ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TORCH_PYTHON:-$HOME/venvs/torchref/bin/python}"
REPS="${REPS:-2}"
BIN=target/release/difflab
REF=../shared/bench/bench_train.py
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" REF_NUM_THREADS="${REF_NUM_THREADS:-2}"
source scripts/bench-configs.sh
out=$(mktemp)
for name in small-8k sanity-gpt2vocab; do
  for rep in $(seq "$REPS"); do
    for dt in f32 bf16; do
      t=$("$PY" "$REF" ${CONFIGS[$name]} --steps 13 --rope true --research true --dtype "$dt" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens_per_second"], d["peak_rss_mib"]-d["rss_after_import_mib"])')
      echo "$name $rep torch-$dt $t" | tee -a "$out"
    done
    for dt in f32 bf16; do
      d=$("$BIN" bench ${CONFIGS[$name]} --steps 13 --rope true --research true --dtype "$dt" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens_per_second"], d["peak_rss_mib"]-d["baseline_rss_mib"], d["mfu"], d["matmul_peak_gflops"])')
      echo "$name $rep difflab-$dt $d" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    name, rep, who, *vals = line.split()
    rows[(name, who)][rep] = [float(v) for v in vals]
print()
print("| config | PyTorch f32 | PyTorch bf16 | difflab f32 | difflab bf16 | bf16 vs PyTorch bf16 | bf16 vs PyTorch f32 | bf16 vs f32 | train MiB (PyTorch f32, bf16, difflab f32, bf16) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
for name in ["small-8k", "sanity-gpt2vocab"]:
    who = ["torch-f32", "torch-bf16", "difflab-f32", "difflab-bf16"]
    med = {w: statistics.median(v[0] for v in rows[(name, w)].values()) for w in who}
    mem = {w: statistics.median(v[1] for v in rows[(name, w)].values()) for w in who}
    pairs = lambda ref: ", ".join(f"{rows[(name, 'difflab-bf16')][r][0] / rows[(name, ref)][r][0]:.2f}x" for r in sorted(rows[(name, ref)]))
    print(f"| {name} | {med['torch-f32']:,.0f} | {med['torch-bf16']:,.0f} | {med['difflab-f32']:,.0f} | {med['difflab-bf16']:,.0f} | "
          f"{med['difflab-bf16'] / med['torch-bf16']:.2f}x ({pairs('torch-bf16')}) | {med['difflab-bf16'] / med['torch-f32']:.2f}x ({pairs('torch-f32')}) | "
          f"{med['difflab-bf16'] / med['difflab-f32']:.2f}x | {', '.join(f'{mem[w]:,.0f}' for w in who)} |")
PY
