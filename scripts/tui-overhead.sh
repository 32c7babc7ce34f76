#!/usr/bin/env bash
# What the dashboard costs the trainer: the same run headless and in the TUI (a real terminal:
# tmux at 160x48), alternated REPS times; prints the median step throughput of each and the ratio.
# Needs: cargo build --release; tmux.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/target/release/difflab"
REPS="${REPS:-3}"
ARGS=(--preset demo --max_steps "${STEPS:-300}" --eval_steps 100000 --save_steps 100000 --log_figures false)
work=$(mktemp -d)
trap 'tmux kill-session -t difflab-overhead 2>/dev/null || true; rm -rf "$work"' EXIT
median_tps() {  # median tokens/s of the progress records of a run, its first 10 steps (warm-up) left out
  python3 - "$1/metrics.jsonl" <<'PY'
import json, statistics, sys
v = [r["tokens_per_second"] for r in map(json.loads, open(sys.argv[1])) if r.get("event") == "progress" and r["step"] > 10]
print(f"{statistics.median(v):.0f}")
PY
}
for rep in $(seq "$REPS"); do
  "$BIN" train "${ARGS[@]}" --output_dir "$work/headless-$rep" >/dev/null 2>&1
  echo "headless $(median_tps "$work/headless-$rep")" | tee -a "$work/results"
  tmux new-session -d -s difflab-overhead -x 160 -y 48 "$BIN ${ARGS[*]} --output_dir $work/tui-$rep; sleep 600"
  until grep -q '"train_end"' "$work/tui-$rep/metrics.jsonl" 2>/dev/null; do sleep 1; done
  tmux kill-session -t difflab-overhead
  echo "tui $(median_tps "$work/tui-$rep")" | tee -a "$work/results"
done
python3 - "$work/results" <<'PY'
import statistics, sys, collections
r = collections.defaultdict(list)
for line in open(sys.argv[1]):
    who, v = line.split(); r[who].append(float(v))
h, t = statistics.median(r["headless"]), statistics.median(r["tui"])
print(f"headless {h:,.0f} tok/s, TUI {t:,.0f} tok/s: the TUI costs {100 * (1 - t / h):.1f}%")
PY
