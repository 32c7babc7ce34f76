#!/usr/bin/env bash
# The whole test suite, set-up included: a virtual environment with TensorBoard (for the
# check that TensorBoard's own reader accepts our event files), then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import tensorboard" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "tensorboard==2.21.*"
fi
export DIFFLAB_PYTHON="$PWD/.venv/bin/python"
cargo test --release -- --include-ignored "$@"
# The dashboard frame-time benchmark: kept compiling, and its table in the log (it asserts that
# each timed frame draws the charts; the 5 ms target is read from the table, not asserted).
cargo bench --bench frame
# The data-parallel build and its `mpirun -n 2` tests (two ranks equal one process; a rank that
# dies ends the job), where Open MPI and libclang are installed (.ci/run installs them).
if command -v mpirun >/dev/null 2>&1 && dpkg -s libopenmpi-dev libclang-dev >/dev/null 2>&1; then
    # --nocapture: the two-host test says how long the job took to end, or why it was skipped
    cargo test --release --features mpi --test dist -- --nocapture "$@"
else
    echo "MPI tests skipped: no Open MPI here (apt-get install libopenmpi-dev openmpi-bin libclang-dev)"
fi
