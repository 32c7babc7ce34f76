#!/usr/bin/env bash
# difflab vs the PyTorch eager reference (../shared/bench), same machine, same run, A B A B.
# Needs: cargo build --release; a Python with torch (see ../shared/bench/README.md), given as
# TORCH_PYTHON (default ~/venvs/torchref/bin/python). Prints one line per measurement and a
# table of medians (tokens/s, training memory = peak - baseline RSS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TORCH_PYTHON:-$HOME/venvs/torchref/bin/python}"
REPS="${REPS:-2}"
BIN=target/release/difflab
REF=../shared/bench/bench_train.py
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" REF_NUM_THREADS="${REF_NUM_THREADS:-2}"
source scripts/bench-configs.sh
out=$(mktemp)
for name in sanity-gpt2vocab sanity-8k small-8k; do
  for research in false true; do
    for rep in $(seq "$REPS"); do
      t=$("$PY" "$REF" ${CONFIGS[$name]} --steps 13 --rope true --research "$research" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens_per_second"], d["peak_rss_mib"]-d["rss_after_import_mib"])')
      echo "$name $research torch $t" | tee -a "$out"
      d=$("$BIN" bench ${CONFIGS[$name]} --steps 13 --rope true --research "$research" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens_per_second"], d["peak_rss_mib"]-d["baseline_rss_mib"], d["mfu"])')
      echo "$name $research difflab $d" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, research, who, *vals = line.split()
    rows[(name, research, who)].append([float(v) for v in vals])
print()
print("| config | research | PyTorch tok/s | difflab tok/s | ratio | PyTorch train MiB | difflab train MiB | difflab MFU |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for name in ["sanity-gpt2vocab", "sanity-8k", "small-8k"]:
    for research in ["false", "true"]:
        t = rows[(name, research, "torch")]; d = rows[(name, research, "difflab")]
        med = lambda xs, i: statistics.median(x[i] for x in xs)
        print(f"| {name} | {research} | {med(t,0):,.0f} | {med(d,0):,.0f} | {med(d,0)/med(t,0):.2f}x | {med(t,1):,.0f} | {med(d,1):,.0f} | {med(d,2):.2f} |")
PY
