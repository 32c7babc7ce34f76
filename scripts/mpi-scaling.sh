#!/usr/bin/env bash
# 1 process x 2 threads against 2 MPI ranks x 1 thread, A B A B, on the sanity shape with an 8k
# vocabulary (the built-in corpus, bpe:8192): median progress tokens/s of each run and rank 0's
# time in the all-reduce. Needs the MPI build: cargo build --release --features mpi
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$PWD/target/release/difflab"
work=$(mktemp -d)
export HOME="$work" DIFFLAB_CACHE="$work/cache" HF_HUB_OFFLINE=1
flags="--dataset builtin --tokenizer bpe:8192 --n_layer 2 --n_head 2 --n_embd 128 --block_size 128 --batch_size 16
  --micro_batch_size 2 --max_steps 80 --eval_steps 100000 --save_steps 0 --logging_steps 10 --rope false
  --research false --learning_rate 1e-3"
median() { python3 -c "
import sys, json
v = sorted(json.loads(l)['tokens_per_second'] for l in open(sys.argv[1]) if '\"progress\"' in l)[2:]
print(round(v[len(v) // 2]))" "$1"; }
RAYON_NUM_THREADS=2 "$bin" train $flags --max_steps 2 --output_dir "$work/warm" >/dev/null 2>&1   # caches
for rep in ${REPS:-1 2}; do
    RAYON_NUM_THREADS=2 "$bin" train $flags --output_dir "$work/a$rep" >"$work/a$rep.out" 2>/dev/null
    RAYON_NUM_THREADS=1 mpirun --allow-run-as-root --oversubscribe -n 2 -x RAYON_NUM_THREADS "$bin" train $flags \
        --output_dir "$work/b$rep" >"$work/b$rep.out" 2>"$work/b$rep.err"
    echo "rep $rep: 1x2 threads $(median "$work/a$rep.out") tok/s | 2 ranks x1 $(median "$work/b$rep.out") tok/s | $(grep -o 'all-reduce took.*' "$work/b$rep.err")"
done
rm -rf "$work"
