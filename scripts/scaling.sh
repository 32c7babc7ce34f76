#!/usr/bin/env bash
# How difflab's cost grows with the work, each row measured on this machine (docs/PERFORMANCE.md):
#   1. training tokens/s and memory against model size (sanity, small, mid; block 256,
#      micro-batch 1, batch 2, GPT-2 vocabulary) and against block size (sanity, 128 to 1024);
#   2. data preparation time and peak memory against corpus size (1, 10, 100 MB of text, the
#      GPT-2 tokenizer), first run (empty cache) and cached;
#   3. checkpoint save and load at the mid shape;
#   4. start-up time to the first step (sanity shape, cached data).
# Needs: cargo build --release; GPT2_TOKENIZER (a GPT-2 tokenizer.json, default
# ../shared/data/gpt2-tokenizer/tokenizer.json) and WIKI (a folder of WikiText .raw files,
# default ../shared/data/wikitext-2-raw) for the corpora. ~10 minutes on 2 cores;
# SKIP_TRAINING=1 and SKIP_DATA=1 leave out the first two sections.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release/difflab
TOK="${GPT2_TOKENIZER:-$PWD/../shared/data/gpt2-tokenizer/tokenizer.json}"
WIKI="${WIKI:-$PWD/../shared/data/wikitext-2-raw}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export DIFFLAB_CACHE="$work/cache"

cat > "$work/row.py" <<'PY'
import json, sys
d = json.load(sys.stdin)
c = d["config"]
train_mib = d["peak_rss_mib"] - d["baseline_rss_mib"]
print(f"| {c['n_layer']} x {c['n_embd']} ({d['n_params'] / 1e6:.1f}M) | {c['block_size']} | {d['tokens_per_second']:,.0f} "
      f"| {d['eval_tokens_per_second']:,.0f} | {train_mib:,.0f} | {d['mfu']:.2f} | {d['micro_batches_side_by_side']} |")
PY
bench() { "$BIN" bench "$@" | python3 "$work/row.py"; }

if [ -z "${SKIP_TRAINING:-}" ]; then
echo "## Training against model size (block 256, micro-batch 1, batch 2, vocabulary 50257)"
echo "| model | block | train tok/s | eval tok/s | train MiB | MFU | side by side |"
echo "|---|---:|---:|---:|---:|---:|---:|"
common="--vocab_size 50257 --micro_batch_size 1 --batch_size 2 --rope true --research true"
bench --n_layer 2 --n_head 2 --n_embd 128 --block_size 256 $common --steps 8
bench --n_layer 4 --n_head 4 --n_embd 256 --block_size 256 $common --steps 6
bench --n_layer 12 --n_head 12 --n_embd 768 --block_size 256 $common --steps 4 --warmup_steps 1

echo
echo "## Training against block size (sanity model 2 x 128, micro-batch 1, batch 2, vocabulary 50257)"
echo "| model | block | train tok/s | eval tok/s | train MiB | MFU | side by side |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for t in 128 256 512 1024; do
  bench --n_layer 2 --n_head 2 --n_embd 128 --block_size "$t" $common --steps 8
done

fi

python3 - "$WIKI" "$work" <<'PY'
import os, sys
wiki, work = sys.argv[1], sys.argv[2]
text = "".join(open(os.path.join(wiki, f), encoding="utf-8").read() for f in sorted(os.listdir(wiki)) if f.endswith(".raw"))
for mb in (1, 10, 100):
    want = mb * 1_000_000
    body = (text * (want // len(text) + 1))[:want]
    open(os.path.join(work, f"corpus-{mb}mb.txt"), "w", encoding="utf-8").write(body)
PY

if [ -z "${SKIP_DATA:-}" ]; then
echo
echo "## Data preparation (GPT-2 tokenizer; a corpus of WikiText-2 text repeated to size)"
tiny="--tokenizer $TOK --n_layer 1 --n_head 1 --n_embd 16 --block_size 64 --batch_size 1 --micro_batch_size 1
  --max_steps 1 --eval_max_blocks 1 --save_steps 0 --log_tensorboard false --log_figures false --logging_steps 1"
echo "| corpus | run | wall s | peak RSS MiB |"
echo "|---|---|---:|---:|"
for mb in 1 10 100; do
  rm -rf "$DIFFLAB_CACHE"
  for run in first cached; do
    /usr/bin/time -f "%e %M" -o "$work/time" "$BIN" train --dataset "$work/corpus-${mb}mb.txt" $tiny \
      --output_dir "$work/prep-$mb-$run" > /dev/null 2> "$work/stderr" || { cat "$work/stderr"; exit 1; }
    read -r wall kib < "$work/time"
    echo "| ${mb} MB | $run | $wall | $((kib / 1024)) |"
  done
done
fi

echo
echo "## Checkpoint save and load at the mid shape (12 x 768, block 1024, vocabulary 50257)"
mid="--dataset $work/corpus-10mb.txt --tokenizer $TOK --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024
  --batch_size 1 --micro_batch_size 1 --eval_max_blocks 1 --log_tensorboard false --log_figures false --logging_steps 1"
"$BIN" train $mid --max_steps 1 --save_steps 1 --output_dir "$work/mid" > "$work/mid.out"
"$BIN" train $mid --max_steps 2 --save_steps 1 --output_dir "$work/mid" --resume_from_checkpoint latest > "$work/mid-resume.out" 2>&1
python3 - "$work/mid.out" "$work/mid-resume.out" "$work/mid" <<'PY'
import json, os, re, sys
saves = [json.loads(l) for l in open(os.path.join(sys.argv[3], "metrics.jsonl")) if '"event":"checkpoint"' in l]
resumed = [l for l in open(sys.argv[2]) if "resuming from" in l]
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(sys.argv[3], "checkpoint-1")) for f in fs)
load = re.search(r"checked in ([0-9.]+) s", resumed[0]).group(1)
print(f"save {saves[0]['seconds']:.2f} s, load and check {load} s, checkpoint-1 {size / 2**20:,.0f} MiB (weights + AdamW moments)")
PY

echo
echo "## Start-up to the first step (sanity shape 2 x 128, block 128, GPT-2 vocabulary, cached data)"
python3 - "$BIN" "$work" "$TOK" <<'PY'
import subprocess, sys, time
bin, work, tok = sys.argv[1:]
args = [bin, "train", "--dataset", f"{work}/corpus-10mb.txt", "--tokenizer", tok, "--n_layer", "2", "--n_head", "2",
        "--n_embd", "128", "--block_size", "128", "--batch_size", "16", "--micro_batch_size", "2", "--max_steps", "2",
        "--logging_steps", "1", "--eval_max_blocks", "1", "--save_steps", "0", "--output_dir", f"{work}/startup"]
for i in range(3):
    t0 = time.monotonic()
    p = subprocess.Popen(args + ["--overwrite_output_dir", "true"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = None
    for line in p.stdout:
        if first is None and '"event":"progress"' in line:
            first = time.monotonic() - t0
    p.wait()
    print(f"run {i + 1}: first step logged {first:.2f} s after launch")
PY
