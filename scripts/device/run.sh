#!/usr/bin/env bash
# Usage: bash .device-check/run.sh OUTDIR
#
# The GPU-machine half of scripts/device-check, which stages this file as .device-check/run.sh
# beside the binaries it runs (source: scripts/device/run.sh). Needs bash, coreutils, python3;
# uses nvidia-smi and compute-sanitizer when present. Runs from any cwd, in a few minutes:
#   1. nvidia-smi -L and the GPU name and driver version;
#   2. every staged GPU test binary (staged xz-packed: unpacked here with Python's lzma and checked
#      against their sha256), PAGED_GQA_REQUIRE_GPU=1, --test-threads=1;
#   3. `paged-gqa demo` (the test `cli_demo`; `cli_demo_used_gpu` checks the decode ran on the GPU);
#   4. compute-sanitizer memcheck and racecheck over every staged GPU test binary (small cases),
#      then `paged-gqa bench --quick` (records: OUTDIR/bench.json, plot: OUTDIR/bench.svg), the
#      three attention paths on the decode shapes (OUTDIR/bench-kernels.json) and
#      the peers on the same shapes (torch_peers.py, when torch imports: PyTorch SDPA, FlashInfer
#      and FlashAttention-3 from the staged peers/);
#   5. record.py: OUTDIR/record.json (always), OUTDIR/device-check.log (all logs in one file).
# Each step's output is teed to OUTDIR/<step>.log and to stdout. At most 8 files come back from
# the device tool's $OUT, so when the step logs would make OUTDIR hold more than 8 files they are
# packed into OUTDIR/logs.tar.gz (device-check.log holds them all anyway).
# Exit status: 0 when every test passed and the sanitizers found no error; 1 otherwise; 2 for
# bad usage. DEVICE_CHECK_BUDGET_S (default 300) bounds the whole run: a step that would start
# past it is skipped and counted as failed.
set -uo pipefail # not -e: every step runs and its failure is recorded

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $# -ne 1 || -z "$1" ]]; then
  echo "usage: bash $here/run.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd) || {
  echo "run.sh: cannot use $1 as the output folder" >&2
  exit 2
}
start=$(date +%s)
deadline=$((start + ${DEVICE_CHECK_BUDGET_S:-300}))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
steps="$work/steps.tsv" # kind, name, log, exit status (or "skipped"), seconds
: >"$steps"
rm -f "$out/record.json" "$out/device-check.log" "$out/logs.tar.gz"

# step KIND NAME LOG CAP_S COMMAND...: runs COMMAND under a timeout of CAP_S (or what is left
# of the budget), output teed to OUTDIR/LOG; appends a line to $steps.
step() {
  local kind=$1 name=$2 log=$3 cap=$4
  shift 4
  local left=$((deadline - $(date +%s))) limit t0 rc
  if ((left < 15)); then
    echo "### $kind $name: skipped, the run's time budget is spent" | tee "$out/$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$kind" "$name" "$log" skipped 0 >>"$steps"
    return
  fi
  limit=$((cap < left ? cap : left))
  echo "### $kind $name: $* (timeout ${limit}s, $(date -u +%Y-%m-%dT%H:%M:%SZ))" | tee "$out/$log"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/$log"
  rc=${PIPESTATUS[0]}
  echo "### $kind $name: exit status $rc after $(($(date +%s) - t0))s" | tee -a "$out/$log"
  printf '%s\t%s\t%s\t%s\t%s\n' "$kind" "$name" "$log" "$rc" "$(($(date +%s) - t0))" >>"$steps"
}

# 1. The GPU.
if command -v nvidia-smi >/dev/null; then
  step info nvidia-smi nvidia-smi.log 30 nvidia-smi -L
  timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$work/gpu.csv" 2>&1
  cat "$work/gpu.csv" | tee -a "$out/nvidia-smi.log"
else
  echo "### info nvidia-smi: not found on PATH; no GPU name or driver version" | tee "$out/nvidia-smi.log"
  printf '%s\t%s\t%s\t%s\t%s\n' info nvidia-smi nvidia-smi.log absent 0 >>"$steps"
fi

# 2. The GPU test binaries (and the CLI), staged xz-packed: unpacked into the scratch folder with
# Python's lzma and checked against the sha256 staged beside each.
mkdir -p "$work/tests" "$work/bin"
python3 - "$here" "$work" >"$out/unpack.log" 2>&1 <<'EOF'
import glob, hashlib, lzma, os, sys
here, work = sys.argv[1:]
bad = 0
for src in sorted(glob.glob(f"{here}/tests/*.xz") + glob.glob(f"{here}/bin/*.xz")):
    rel = os.path.relpath(src, here)[: -len(".xz")]
    dst = os.path.join(work, rel)
    want = open(os.path.join(here, rel + ".sha256")).read().split()[0]
    digest = hashlib.sha256()
    with lzma.open(src) as f, open(dst, "wb") as g:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            g.write(chunk)
    os.chmod(dst, 0o755)
    ok = digest.hexdigest() == want
    bad += not ok
    print(f"unpacked {rel}: sha256 {digest.hexdigest()}" + ("" if ok else f", staged {want}: NOT used"))
    if not ok:
        os.remove(dst)
sys.exit(1 if bad else 0)
EOF
echo "### unpack: exit status $? (see unpack.log)" | tee -a "$out/unpack.log"
# DEVICE_CHECK_REQUIRE_GPU=0 lets a dry run on a machine without a GPU show every binary start and
# skip (the record then says no GPU was found); on the GPU machine a missing GPU is a failure.
export PAGED_GQA_REQUIRE_GPU=${DEVICE_CHECK_REQUIRE_GPU:-1} RUST_BACKTRACE=1
binaries=()
for bin in "$work"/tests/*; do
  [[ -f "$bin" ]] || continue
  binaries+=("$bin")
done
if ((${#binaries[@]} == 0)); then
  echo "### test: no GPU test binaries in $here/tests" | tee "$out/no-gpu-tests.log"
  printf '%s\t%s\t%s\t%s\t%s\n' test no_gpu_test_binaries no-gpu-tests.log absent 0 >>"$steps"
fi
for bin in "${binaries[@]}"; do
  name=$(basename "$bin")
  # The sim_* twins run the same bodies on the kernel emulator: CI's job, not the GPU's.
  step test "$name" "$name.log" 120 "$bin" --test-threads=1 --skip sim_
done

# 3. The CLI demo.
step demo cli_demo cli_demo.log 60 "$work/bin/paged-gqa" demo
# 4. compute-sanitizer over the (small) GPU tests.
sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
  ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda-*/bin/compute-sanitizer; do
  [[ -z "$sanitizer" && -x "$candidate" ]] && sanitizer=$candidate
done
for tool in memcheck racecheck; do
  if [[ -z "$sanitizer" ]]; then
    echo "### sanitizer $tool: compute-sanitizer not found (PATH, /usr/local/cuda/bin, /usr/local/cuda/compute-sanitizer); recorded as -1" \
      | tee "$out/$tool.log"
    printf '%s\t%s\t%s\t%s\t%s\n' "sanitizer-$tool" "" "$tool.log" absent 0 >>"$steps"
    continue
  fi
  for bin in "${binaries[@]}"; do
    name=$(basename "$bin")
    step "sanitizer-$tool" "$name" "$tool-$name.log" 150 \
      "$sanitizer" --tool "$tool" --error-exitcode 1 "$bin" --test-threads=1 --skip sim_ \
      --skip 32k --skip batch_fills --skip cuda_graph --skip prompts_chunks --skip prefill_matches \
      --skip 10k_cached --skip speculative --skip model_shapes # small cases only: the sanitizers are slow
  done
done

# 4b. After the checks of correctness, the benchmark sweep (its records become the record's
# figures): fused vs naive, Llama-3-8B and -70B, batch 1/16/64, context 1k/8k/32k.
step bench bench bench.log 90 "$work/bin/paged-gqa" bench --quick --iters 10 \
  --json "$out/bench.json" --svg "$out/bench.svg"
# Prefill: whole causal prompts of 1k/4k/8k (Llama-3-8B and -70B heads), TFLOP/s.
step bench bench_prefill bench-prefill.log 60 "$work/bin/paged-gqa" bench --mode prefill --quick \
  --iters 5 --json "$out/bench-prefill.json"
# The three attention paths timed against each other (CUDA cores, wide and narrow tensor-core
# layouts) on the profiler's decode shapes: the first GPU run settles KernelChoice::Auto's rule
# (src/plan.rs), which the profiler's model derived.
step bench bench_kernels bench-kernels.log 90 "$work/bin/paged-gqa" bench --iters 3 \
  --kernels cuda-cores --kernels tensor-cores --kernels narrow-tensor-cores \
  --model Llama-3-8B --model Llama-3-70B --model Qwen2.5-0.5B --model Falcon-7B \
  --model gpt-oss-20b --model Gemma-2-9B --batch 1 --batch 64 --context 1024 --context 8192 \
  --json "$out/bench-kernels.json"
# PyTorch peers on the same shapes, added to bench.json (when torch and the records are there).
if [[ -f "$out/bench.json" ]] && python3 -c "import torch" 2>/dev/null; then
  # The staged FlashInfer wheels, installed for this run only (no network there).
  if compgen -G "$here/peers/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/pk" "$here"/peers/*.whl \
      >"$out/peers-install.log" 2>&1 || echo "run.sh: staged peer wheels did not install" >&2
    export PYTHONPATH="$work/pk${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/pk/bin:$PATH" FLASHINFER_CUDA_ARCH_LIST=9.0
  fi
  # FlashAttention-3: vllm 0.26.0's _vllm_fa3_C.abi3.so, staged xz-compressed; unpacked for this run
  # and checked against its staged sha256. When it was staged, torch_peers.py gets --fa3-lib even if
  # the unpacking failed: each record then carries the load error for that peer.
  fa3_args=()
  if [[ -f "$here/peers/_vllm_fa3_C.abi3.so.xz" ]]; then
    mkdir -p "$work/fa3"
    if ! python3 - "$here/peers/_vllm_fa3_C.abi3.so.xz" "$here/peers/_vllm_fa3_C.abi3.so.sha256" \
      "$work/fa3/_vllm_fa3_C.abi3.so" >>"$out/peers-install.log" 2>&1 <<'EOF'
import hashlib, lzma, os, sys
src, sums, dst = sys.argv[1:]
want = open(sums).read().split()[0]
digest = hashlib.sha256()
with lzma.open(src) as f, open(dst + ".part", "wb") as g:
    while chunk := f.read(1 << 20):
        digest.update(chunk)
        g.write(chunk)
if digest.hexdigest() != want:
    sys.exit(f"{dst}: sha256 {digest.hexdigest()}, staged {want}; not used")
os.replace(dst + ".part", dst)
print(f"unpacked {dst} (sha256 {want})")
EOF
    then
      echo "run.sh: the staged FA3 library did not unpack (see peers-install.log)" >&2
    fi
    fa3_args=(--fa3-lib "$work/fa3/_vllm_fa3_C.abi3.so" --fa3-timeout 60)
  fi
  step peers torch_peers torch_peers.log 150 python3 "$here/torch_peers.py" --records "$out/bench.json" \
    --records "$out/bench-prefill.json" ${fa3_args[@]+"${fa3_args[@]}"}
fi

# 5. The record, always; its exit status is the run's.
python3 "$here/record.py" --staged "$here" --out "$out" --steps "$steps" --gpu-csv "$work/gpu.csv" \
  --start "$start" --sanitizer "${sanitizer:-}"
rc=$?
if [[ ! -f "$out/record.json" ]]; then
  # record.py itself broke: leave a minimal record that says so.
  commit=$(sed -n 's/.*"commit": *"\([^"]*\)".*/\1/p' "$here/source.json" | head -n 1)
  printf '{"commit": "%s", "date": "%s", "error": "record.py failed with exit status %s", "passed": 0, "failed": 1, "tests": {}, "figures": [], "logs": []}\n' \
    "$commit" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$rc" >"$out/record.json"
  echo "run.sh: record.py failed (exit status $rc); wrote a minimal $out/record.json" >&2
  exit 1
fi
exit "$rc"
