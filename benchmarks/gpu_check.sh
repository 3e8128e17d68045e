#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the whole test suite, run compute-sanitizer memcheck
# on a small CUDA case, run the served reward model's tests against vLLM on the GPU and the ABC plugin's rows against
# transformers' eager attention in bf16 (where a Python with vLLM is found), run the benchmark grid on the GPU, and put everything under $OUT (at most 8 files):
#   gpu_check.log       everything printed, build and test outcome first
#   device.txt          GPU name, driver, torch and CUDA versions, nvcc, date
#   dense_rewards.json, dense_rewards.md, dense_rewards.png   the benchmark (also in benchmarks/results/<gpu>/)
#   ncu_dense_rewards.ncu-rep   only with DENSE_RLHF_NCU=1: one native call profiled by Nsight Compute
# Works offline (pip: --no-build-isolation --no-deps --no-index) and finishes in under 8 minutes: each stage
# has a time limit, and the benchmark gets what is left of the budget.
#
# Usage, in the repository root:   OUT=/path/to/out bash benchmarks/gpu_check.sh
# Python packages the machine lacks (trl, datasets and expecttest were missing from its image: their tests skip)
# can travel as x86-64 / Python 3.12 wheels in .whl/ (see the device notes); they are installed into a scratch
# folder on PYTHONPATH first.
# Environment: PYTHON (default python), DENSE_RLHF_NCU=1 (profile), CHECK_BUDGET_S (default 460),
#              BENCH_ARGS (extra arguments for the benchmark, e.g. "--quick"),
#              VLLM_PYTHON (a Python with vLLM for the served stage; default PYTHON; the stage is skipped without it).
set -uo pipefail

OUT=${OUT:?set OUT to the folder that collects the results}
PYTHON=${PYTHON:-python}
BUDGET_S=${CHECK_BUDGET_S:-460}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

stage() { printf '\n==== %s (at %ss)\n' "$1" "$SECONDS"; }
left() { echo $((BUDGET_S - SECONDS)); }

if compgen -G ".whl/*.whl" >/dev/null; then
  stage "carried wheels"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SCRATCH/site" \
    .whl/*.whl && export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
fi

stage "device"
{
  date -u '+date: %Y-%m-%d %H:%M:%S UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
  "$PYTHON" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))'
  nvcc --version | tail -n 2
} 2>&1 | tee "$OUT/device.txt"

ARCH=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)
ARCH=${ARCH:-9.0}

stage "build (TORCH_CUDA_ARCH_LIST=$ARCH)"
build_start=$SECONDS
DENSE_RLHF_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 timeout 300 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . >"$SCRATCH/build.log" 2>&1
build_rc=$?
grep -iE "error|warning" "$SCRATCH/build.log" | head -n 20
tail -n 3 "$SCRATCH/build.log"
if [ "$build_rc" -ne 0 ]; then  # e.g. a pip or setuptools too old for offline editable installs
  echo "pip failed (rc=$build_rc); building in place with setup.py instead"
  DENSE_RLHF_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 timeout 300 \
    "$PYTHON" setup.py build_ext --inplace >"$SCRATCH/build_inplace.log" 2>&1
  build_rc=$?
  grep -iE "error" "$SCRATCH/build_inplace.log" | head -n 20
fi
"$PYTHON" -c 'from dense_rlhf import _native; import sys; print("kernels:", _native.KERNELS); sys.exit(0 if _native.has_kernel("cuda") else 1)'
kernel_rc=$?
echo "BUILD: rc=$build_rc, CUDA kernel registered: $([ "$kernel_rc" -eq 0 ] && echo yes || echo no) ($((SECONDS - build_start)) s)"

stage "tests"
"$PYTHON" -c 'import importlib.util as u; print("test packages present:", {m: u.find_spec(m) is not None for m in ("pytest", "hypothesis", "expecttest", "transformers", "triton", "matplotlib")})'
test_start=$SECONDS
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -m "not packaging and not cuda" tests 2>&1 | tail -n 40
test_rc=${PIPESTATUS[0]}
echo "TESTS: rc=$test_rc ($((SECONDS - test_start)) s; 124 means the time limit)"

stage "compute-sanitizer memcheck"
cat >"$SCRATCH/memcheck_case.py" <<'PY'
"""Small CUDA calls of dense_rewards: validate on and off, reward_index, left padding, every layout."""
import torch

import dense_rlhf

g = torch.Generator().manual_seed(0)
B, H, L = 3, 2, 37
maps = torch.rand(B, H, L, L, generator=g)
score = torch.randn(B, generator=g)
mask = torch.zeros(B, L, dtype=torch.bool)
mask[0, 5:30] = True  # prompt then completion, right padding
mask[1, 20:] = True  # left padding: completion runs to the end
mask[2, 1:L - 3] = True
index = torch.tensor([29, L - 1, 10])
for dtype in (torch.float32, torch.bfloat16):
    for attn in (maps, maps[:, :, -1, :], maps[:, 0, -1, :]):
        for kwargs in ({}, {"reward_index": index}):
            if attn.dim() != 4 and kwargs:
                continue
            args = (attn.to(dtype), score, mask)
            ref = dense_rlhf.dense_rewards(*args, backend="reference", **kwargs)
            for validate in (True, False):
                cuda_args = [t.cuda() for t in args]
                cuda_kwargs = {k: v.cuda() for k, v in kwargs.items()}
                out = dense_rlhf.dense_rewards(*cuda_args, backend="native", validate=validate, **cuda_kwargs)
                torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
torch.cuda.synchronize()
print("memcheck case: all CUDA results match the reference")
PY
# No caching allocator, so that every tensor is its own allocation and an out-of-bounds access is seen.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --leak-check no \
  --error-exitcode 99 "$PYTHON" "$SCRATCH/memcheck_case.py" 2>&1 | tail -n 25
memcheck_rc=${PIPESTATUS[0]}
echo "MEMCHECK: rc=$memcheck_rc (0 clean, 99 errors found, 124 time limit)"

if [ "${DENSE_RLHF_NCU:-0}" = "1" ]; then
  stage "ncu: one native call, bf16 rows [256, 64, 8192]"
  cat >"$SCRATCH/ncu_case.py" <<'PY'
import torch

import dense_rlhf

B, H, L = 256, 64, 8192
attn = torch.rand(B, H, L, device="cuda").bfloat16()
score = torch.randn(B, device="cuda")
mask = torch.zeros(B, L, dtype=torch.bool, device="cuda")
mask[:, L // 8:] = True
for _ in range(2):  # the second call is the one profiled
    dense_rlhf.dense_rewards(attn, score, mask, backend="native", validate=False)
torch.cuda.synchronize()
PY
  # Three kernels per call (row_bounds, accumulate, finalize): skip the first call's, profile the second's.
  timeout 120 ncu --target-processes all --kernel-name regex:'row_bounds|accumulate|finalize' \
    --launch-skip 3 --launch-count 3 --set full -f -o "$OUT/ncu_dense_rewards" \
    "$PYTHON" "$SCRATCH/ncu_case.py" 2>&1 | tail -n 5
  timeout 30 ncu --import "$OUT/ncu_dense_rewards.ncu-rep" --page details --section SpeedOfLight 2>&1 | head -n 60
fi

stage "served reward model: vLLM on the GPU"
# tests/test_vllm.py with its six servers on the GPU (flags below instead of the CPU backend's): the served prefix
# scores and rewards against the same weights in-process (on the CPU here), and the errors. Tests that need verl skip.
VLLM_PYTHON=${VLLM_PYTHON:-$PYTHON}
served_rc=skipped
if ! "$VLLM_PYTHON" -c 'import vllm' >/dev/null 2>&1; then
  echo "SERVED: skipped, $VLLM_PYTHON cannot import vllm (set VLLM_PYTHON to a Python that has it)"
elif [ "$(left)" -lt 200 ]; then
  echo "SERVED: skipped, only $(left) s of the budget left"
else
  served_start=$SECONDS
  # vLLM loads the ABC plugin (the ABC servers of the tests, the stage below) by its entry point: the build stage
  # installed this tree into PYTHON; another VLLM_PYTHON gets it here, without the native op
  if [ "$(command -v "$VLLM_PYTHON")" != "$(command -v "$PYTHON")" ]; then
    DENSE_RLHF_NATIVE=0 "$VLLM_PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 3
  fi
  DENSE_RLHF_VLLM_PYTHON=$(command -v "$VLLM_PYTHON") \
    DENSE_RLHF_VLLM_ARGS="--dtype float32 --max-model-len 512 --enforce-eager --gpu-memory-utilization 0.1" \
    timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_vllm.py 2>&1 | tail -n 25
  served_rc=${PIPESTATUS[0]}
  echo "SERVED: rc=$served_rc ($((SECONDS - served_start)) s; 124 means the time limit)"
fi

stage "ABC plugin: vLLM on the GPU, bf16 rows against transformers' eager attention"
# benchmarks/abc_server_check.py twice, CUDA graphs on: vLLM's default model runner, then the V1 runner
# (VLLM_USE_V2_MODEL_RUNNER=0). vLLM loads the plugin by its entry point: the served stage installed it.
abc_rc=skipped
if ! "$VLLM_PYTHON" -c 'import vllm' >/dev/null 2>&1; then
  echo "ABC PLUGIN: skipped, $VLLM_PYTHON cannot import vllm (set VLLM_PYTHON to a Python that has it)"
elif [ "$(left)" -lt 200 ]; then
  echo "ABC PLUGIN: skipped, only $(left) s of the budget left"
else
  abc_rc=0
  for runner in default v1; do
    runner_env=()
    [ "$runner" = v1 ] && runner_env=(VLLM_USE_V2_MODEL_RUNNER=0)
    env ${runner_env[@]+"${runner_env[@]}"} timeout 180 "$PYTHON" benchmarks/abc_server_check.py \
      --vllm-python "$(command -v "$VLLM_PYTHON")" --device cuda --dtype bfloat16 2>&1 | tail -n 12
    rc=${PIPESTATUS[0]}
    echo "ABC PLUGIN ($runner model runner): rc=$rc (1: rows beyond the tolerance, 124: time limit)"
    [ "$rc" -eq 0 ] || abc_rc=$rc
  done
fi

stage "benchmark grid on the GPU"
bench_budget=$(( $(left) - 25 ))
if [ "$kernel_rc" -ne 0 ]; then
  echo "BENCH: skipped, the CUDA kernel did not build"
elif [ "$bench_budget" -lt 60 ]; then
  echo "BENCH: skipped, only $(left) s of the budget left"
else
  # Starts no new case after bench_budget - 40 s (the rest are listed as skipped); hard limit bench_budget.
  # Targets compiled statically (torch.compile's best case), the rest of the grid with dynamic shapes.
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  # 0.12 s of timed calls per method and case: up to 200 repetitions per round of a kernel of some µs.
  timeout "$bench_budget" "$PYTHON" -m dense_rlhf.cli bench --device cuda --out benchmarks/results \
    --compile-dynamic static-targets --time-budget 0.12 --max-wall-s $((bench_budget - 40)) ${BENCH_ARGS:-} 2>&1 | grep -v -i "warn"
  bench_rc=${PIPESTATUS[0]}
  echo "BENCH: rc=$bench_rc (1: a method disagreed with the reference, 124: time limit)"
  results=$("$PYTHON" -c 'from dense_rlhf.bench.report import device_slug; print("benchmarks/results/" + device_slug("cuda"))')
  cp "$results"/dense_rewards.json "$results"/dense_rewards.md "$OUT"/ 2>/dev/null
  cp "$results"/dense_rewards.png "$OUT"/ 2>/dev/null
  sed -n '/^Targets:/,/^Every method/p' "$OUT/dense_rewards.md" 2>/dev/null
fi

stage "summary"
echo "BUILD rc=$build_rc kernel=$kernel_rc | TESTS rc=$test_rc | MEMCHECK rc=$memcheck_rc | SERVED rc=$served_rc | ABC PLUGIN rc=$abc_rc | total $SECONDS s"
ls -l "$OUT"
