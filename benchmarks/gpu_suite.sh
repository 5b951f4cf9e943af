#!/usr/bin/env bash
# The whole GPU check in one command (issue 4): install, device info, copy bandwidth, the op
# benchmark, GPU tests, op tests, the candidate-ranking benchmark (and the train-step benchmark when
# present). Ends within 8 minutes.
#   OUT=/some/dir bash benchmarks/gpu_suite.sh      (OUT defaults to benchmarks/results/latest;
#   SKIP_INSTALL=1 skips the pip install; DRY_RUN=1 checks the script on a CPU machine: SKIP_INSTALL=1
#   DRY_RUN=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh runs the benchmarks' --dry-run modes and
#   skips the tests)
# Writes at most 8 files to $OUT: install.log, device.txt, pytest.log (GPU tests, then op tests),
# bench.log, rank.json, train_step.log, results.json, results.md. Printed last: the full results
# table, each step's exit status, then the Targets section (PASS / FAIL / UNMEASURED per issue
# target), so that the end of the output (what a one-call GPU session gets back) holds the verdicts.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/latest}"
mkdir -p "$OUT"
DEADLINE=$((SECONDS + 450))  # 8 minutes less a margin for start-up and the final print

left() {  # seconds left for a step: min(cap, time to the deadline), at least 5
    local cap=$1 rest=$((DEADLINE - SECONDS))
    ((rest < cap)) && cap=$rest
    ((cap < 5)) && cap=5
    echo "$cap"
}
DRY=${DRY_RUN:+--dry-run}
STEPS=""  # one line per step: its exit status, repeated before the Targets section
step_done() {  # step_done NAME EXIT [DETAIL]
    echo "exit $2${3:+ ($3)}"
    STEPS+="$1: exit $2${3:+ ($3)}"$'\n'
}

echo "== install"
if [ -n "${SKIP_INSTALL:-}" ]; then
    echo "SKIP_INSTALL set: not installing" >"$OUT/install.log"
elif ! timeout "$(left 150)" pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "install failed or timed out (see install.log); running from the source tree"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== device"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    python3 - <<'PY'
import torch, triton
import pgnas_fast as pf
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name, (ok, why) in pf.backends().items():
    print(f"backend {name}: {'available' if ok else 'unavailable'} ({why})")
if torch.cuda.is_available():
    import triton.testing
    src = torch.randn(1 << 26, device="cuda"); dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    print(f"device copy bandwidth {2 * src.numel() * 4 / ms / 1e6:.0f} GB/s (256 MiB, read + write)")
PY
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

echo "== op benchmark"  # first after the device info: its numbers are what the run is for
BENCH_CAP=$(left 220)
rm -f "$OUT/results.md" "$OUT/results.json"  # no stale verdicts if this run writes none
timeout "$BENCH_CAP" python3 benchmarks/bench_gpu.py $DRY ${DRY_RUN:+--no-compile} --out "$OUT" \
    --time-budget=$((BENCH_CAP - 45)) \
    >"$OUT/bench.log" 2>&1
step_done "op benchmark" $? "$(tail -n 1 "$OUT/bench.log")"

if [ -n "${DRY_RUN:-}" ]; then
    echo "DRY_RUN set: no tests" >"$OUT/pytest.log"
    STEPS+="tests: skipped (DRY_RUN)"$'\n'
else
    echo "== pytest -m gpu: the kernels' correctness first, then launches, syncs, graphs and the rest"
    KERNEL_TESTS="tests/test_native.py tests/test_triton.py tests/test_fused_ops.py"
    timeout "$(left 80)" python3 -m pytest -m gpu -q -p no:cacheprovider $KERNEL_TESTS >"$OUT/pytest.log" 2>&1
    step_done "pytest -m gpu (kernels)" $? "$(tail -n 1 "$OUT/pytest.log")"
    echo "==== the other GPU tests" >>"$OUT/pytest.log"
    timeout "$(left 60)" python3 -m pytest -m gpu -q -p no:cacheprovider tests ${KERNEL_TESTS//tests\//--ignore=tests/} \
        >>"$OUT/pytest.log" 2>&1
    step_done "pytest -m gpu (the rest)" $? "$(tail -n 1 "$OUT/pytest.log")"

    echo "== op tests (philox, ops, triton)"
    echo "==== op tests" >>"$OUT/pytest.log"
    timeout "$(left 90)" python3 -m pytest -q -x -p no:cacheprovider tests/test_philox.py tests/test_ops.py \
        tests/test_triton.py >>"$OUT/pytest.log" 2>&1
    step_done "op tests" $? "$(tail -n 1 "$OUT/pytest.log")"
fi

echo "== candidate ranking (SupNet-MI-shaped; projected hours for 10k CIFAR-10 candidates)"
timeout "$(left 90)" python3 benchmarks/bench_rank_gpu.py $DRY --heldout 2000 --candidates 32 --out "$OUT/rank.json"
step_done "candidate ranking" $?

if [ -f benchmarks/bench_train_step.py ]; then
    echo "== train-step benchmark"
    STEP_CAP=$(left 60)
    timeout "$STEP_CAP" python3 benchmarks/bench_train_step.py $DRY --time-budget=$((STEP_CAP - 15)) \
        >"$OUT/train_step.log" 2>&1
    step_done "train-step benchmark" $?
fi

echo "== op benchmark log (tail)"
tail -n 3 "$OUT/bench.log"
echo
if [ -f "$OUT/results.md" ]; then
    sed '/^## Targets/,/^## All measurements/d' "$OUT/results.md"  # the full table; its Targets come last
else
    echo "no results.md (see bench.log)"
fi
echo "== steps ($SECONDS s in all)"
printf '%s' "$STEPS"
echo "== targets (issues 4, 5, 8)"
sed -n '/^## Targets/,/^## All measurements/{/^## All measurements/!p}' "$OUT/results.md" 2>/dev/null \
    || echo "no results.md: no verdicts (see bench.log)"
