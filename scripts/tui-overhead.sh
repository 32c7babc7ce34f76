#!/usr/bin/env bash
# What the dashboard costs the trainer: the same run headless and in the TUI (a real terminal:
# tmux at 160x48), REPS times in alternating order; prints the median step throughput of each
# and the ratio, and, less noisy on a busy machine, the CPU time of the UI thread and of the tmux
# server. Needs: cargo build --release; tmux; Linux /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/target/release/difflab"
REPS="${REPS:-4}"
ARGS=(--preset demo --max_steps "${STEPS:-300}" --eval_steps 100000 --save_steps 100000 --log_figures false)
work=$(mktemp -d)
trap 'tmux -L difflab-overhead kill-server 2>/dev/null || true; rm -rf "$work"' EXIT

median_tps() {  # median tokens/s of a run's progress records, the first 10 steps (warm-up) left out
  python3 - "$1/metrics.jsonl" <<'PY'
import json, statistics, sys
v = [r["tokens_per_second"] for r in map(json.loads, open(sys.argv[1])) if r.get("event") == "progress" and r["step"] > 10]
print(f"{statistics.median(v):.0f}")
PY
}
cpu_seconds() {  # user + system CPU seconds of a process or thread, from its /proc stat file
  python3 -c 'import os, sys; f = open(sys.argv[1]).read().rsplit(")", 1)[1].split(); print((int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))' "$1"
}
headless() {
  "$BIN" train "${ARGS[@]}" --output_dir "$work/headless-$1" >/dev/null 2>&1
  echo "headless $(median_tps "$work/headless-$1")" | tee -a "$work/results"
}
tui() {
  tmux -L difflab-overhead new-session -d -x 160 -y 48 "$BIN ${ARGS[*]} --output_dir $work/tui-$1; sleep 600"
  until grep -q '"train_end"' "$work/tui-$1/metrics.jsonl" 2>/dev/null; do sleep 1; done
  local shell pid server runtime
  shell=$(tmux -L difflab-overhead list-panes -F '#{pane_pid}')
  pid=$(pgrep -P "$shell" -x difflab)
  server=$(tmux -L difflab-overhead display-message -p '#{pid}')
  runtime=$(python3 -c 'import json,sys; print([r for r in map(json.loads, open(sys.argv[1])) if r.get("event") == "train_end"][-1]["train_runtime"])' "$work/tui-$1/metrics.jsonl")
  echo "ui-thread-cpu $(cpu_seconds "/proc/$pid/task/$pid/stat") tmux-server-cpu $(cpu_seconds "/proc/$server/stat") run-seconds $runtime" | tee -a "$work/cpu"
  tmux -L difflab-overhead kill-server
  echo "tui $(median_tps "$work/tui-$1")" | tee -a "$work/results"
}

# the order alternates, so neither mode always runs second on a machine that warms up or drifts
for rep in $(seq "$REPS"); do
  if (( rep % 2 )); then headless "$rep"; tui "$rep"; else tui "$rep"; headless "$rep"; fi
done

python3 - "$work/results" "$work/cpu" <<'PY'
import collections, statistics, sys
r = collections.defaultdict(list)
for line in open(sys.argv[1]):
    who, v = line.split(); r[who].append(float(v))
h, t = statistics.median(r["headless"]), statistics.median(r["tui"])
pairs = statistics.median(1 - b / a for a, b in zip(r["headless"], r["tui"]))
print(f"headless {h:,.0f} tok/s, TUI {t:,.0f} tok/s (medians): the TUI costs {100 * (1 - t / h):.1f}%; "
      f"median over same-rep pairs {100 * pairs:.1f}%")
rows = [l.split() for l in open(sys.argv[2])]
ui, tm, run = (sum(float(x[i]) for x in rows) for i in (1, 3, 5))
print(f"UI thread {ui:.2f} s and tmux server {tm:.2f} s of CPU over {run:.0f} s of training: "
      f"{100 * (ui + tm) / run:.2f}% of one core")
PY
