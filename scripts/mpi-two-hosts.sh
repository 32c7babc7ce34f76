#!/usr/bin/env bash
# Two ranks on two hosts against two ranks on one, A B A B: the demo preset (micro-batches of 4,
# 30 steps, one thread a rank) with both ranks in this machine's namespace (shared memory, then
# TCP), and with one rank in each of two network namespaces joined by a veth pair (two hosts,
# TCP between them, Open MPI launching through a plm_rsh_agent that enters the other namespace).
# Each host gets its own core (taskset; --bind-to none), as two machines would: left to itself,
# each host's Open MPI binds its rank to "its" core 0, the same core, and the two ranks take
# turns on it (the last row shows that). Prints each run's tokens/s and rank 0's all-reduce
# share (the wait after the backward; with the all-reduce overlapped, the calls' own time too),
# with the all-reduce overlapped with the backward (the default) and after it. Root only (ip netns); needs the MPI build: cargo build --release --features mpi.
# BIN=path measures another build; STEPS=N trains N steps; EXTRA="--flag v" adds flags to every
# run; RATE=1gbit shapes the link between the two hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${BIN:-$PWD/target/release/difflab}"
work=$(mktemp -d)
ns=(dlbench-a dlbench-b); ips=(10.78.0.1 10.78.0.2)
cleanup() { ip netns delete "${ns[0]}" 2>/dev/null || true; ip netns delete "${ns[1]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ip netns add "${ns[0]}"; ip netns add "${ns[1]}"
ip link add dlbench-va type veth peer name dlbench-vb
for i in 0 1; do
    v=$([ $i = 0 ] && echo dlbench-va || echo dlbench-vb)
    ip link set "$v" netns "${ns[$i]}"
    ip -n "${ns[$i]}" addr add "${ips[$i]}/24" dev "$v"
    ip -n "${ns[$i]}" link set "$v" up
    ip -n "${ns[$i]}" link set lo up
    # RATE=1gbit: each direction of the link shaped to that rate (tc's token bucket), a slower
    # network than the veth's memory copies
    if [ -n "${RATE:-}" ]; then ip netns exec "${ns[$i]}" tc qdisc add dev "$v" root tbf rate "$RATE" burst 256kb latency 100ms; fi
done
cat >"$work/agent" <<AGENT
#!/bin/sh
host=\$1; shift
case "\$host" in ${ips[0]}) n=${ns[0]}; c=0 ;; ${ips[1]}) n=${ns[1]}; c=1 ;; *) exit 1 ;; esac
if [ -n "\$PIN" ]; then exec taskset -c \$c ip netns exec \$n sh -c "\$*"; fi
exec ip netns exec \$n sh -c "\$*"
AGENT
chmod +x "$work/agent"
printf "%s slots=1\n%s slots=1\n" "${ips[0]}" "${ips[1]}" >"$work/hosts"
export HOME="$work" DIFFLAB_CACHE="$work/cache" HF_HUB_OFFLINE=1 RAYON_NUM_THREADS=1
flags="--preset demo --micro_batch_size 4 --max_steps ${STEPS:-30} --eval_steps 100000 --save_steps 0 --logging_steps 5 ${EXTRA:-}"
"$bin" train $flags --max_steps 1 --output_dir "$work/warm" >/dev/null 2>&1   # the token cache
common=(--allow-run-as-root -x HOME -x DIFFLAB_CACHE -x HF_HUB_OFFLINE -x RAYON_NUM_THREADS)
report() {  # name, stderr file
    local tps share
    tps=$(grep -o '| [0-9.]*k tok/s$' "$2" | tail -1 | tr -d '| ')
    share=$(grep -o 'took [0-9.]* s of [0-9.]* s of training on rank 0 ([0-9.]*%).*' "$2")
    printf "%-46s %10s  all-reduce %s\n" "$1" "$tps" "$share"
}
for rep in ${REPS:-1 2}; do
    ip netns exec "${ns[0]}" mpirun "${common[@]}" --oversubscribe -n 2 --mca btl vader,self \
        "$bin" train $flags --output_dir "$work/shm$rep" >/dev/null 2>"$work/shm$rep.err"
    report "rep $rep: one host, shared memory" "$work/shm$rep.err"
    ip netns exec "${ns[0]}" mpirun "${common[@]}" --oversubscribe -n 2 --mca btl tcp,self \
        --mca btl_tcp_if_include 10.78.0.0/24 "$bin" train $flags --output_dir "$work/tcp$rep" >/dev/null 2>"$work/tcp$rep.err"
    report "rep $rep: one host, TCP" "$work/tcp$rep.err"
    two=(-n 2 --hostfile "$work/hosts" --mca plm_rsh_agent "$work/agent" --mca btl tcp,self
        --mca btl_tcp_if_include 10.78.0.0/24 --mca oob_tcp_if_include 10.78.0.0/24)
    PIN=1 taskset -c 0 ip netns exec "${ns[0]}" mpirun "${common[@]}" -x PIN --bind-to none "${two[@]}" \
        "$bin" train $flags --output_dir "$work/two$rep" >/dev/null 2>"$work/two$rep.err"
    report "rep $rep: two hosts, TCP, a core each" "$work/two$rep.err"
    PIN=1 taskset -c 0 ip netns exec "${ns[0]}" mpirun "${common[@]}" -x PIN --bind-to none "${two[@]}" \
        "$bin" train $flags --grad_reduce_overlap false --output_dir "$work/after$rep" >/dev/null 2>"$work/after$rep.err"
    report "rep $rep: the same, all-reduce after the backward" "$work/after$rep.err"
done
ip netns exec "${ns[0]}" mpirun "${common[@]}" "${two[@]}" "$bin" train $flags --output_dir "$work/same" >/dev/null 2>"$work/same.err"
report "two hosts, TCP, Open MPI's binding: one core" "$work/same.err"
grep -h -o 'train loss [0-9.]*' "$work"/*.err | sort | uniq -c | sed 's/^/final /'
