# The comparison shapes of ../shared/bench/README.md, as flags both trainers take; sourced by
# bench-vs-torch.sh and bench-bf16-vs-torch.sh (one copy).
declare -A CONFIGS=(
  [sanity-gpt2vocab]="--n_layer 2 --n_head 2 --n_embd 128 --block_size 128 --vocab_size 50257 --micro_batch_size 2 --batch_size 16"
  [sanity-8k]="--n_layer 2 --n_head 2 --n_embd 128 --block_size 128 --vocab_size 8192 --micro_batch_size 2 --batch_size 16"
  [small-8k]="--n_layer 4 --n_head 4 --n_embd 256 --block_size 256 --vocab_size 8192 --micro_batch_size 4 --batch_size 16"
)
