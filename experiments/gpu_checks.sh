#!/bin/bash
# The checks and benchmarks that need an accelerator, as one script for a lent GPU machine
# (the `device` tool: one call per part). From the repo root:
#
#   KVLAB_GIT_REV=$(git rev-parse --short HEAD) bash experiments/gpu_checks.sh OUT_DIR [PART]
#
# PART: kernels (the Pallas kernels' tests compiled, then the decode kernels' benchmarks: at most
# 8 min), models (kvlab vs kvpress and paged decode on the default model's twin: about 4 min),
# overhead (the column-sum kernels' tests compiled, then every method's observe + compress
# overhead at 4k on the twin, h2o / keyformer with each column-sum path, kvzip and kvzip_heads
# (a head table calibrated on the twin first); the kernels timed alone: about 5 min before the
# kvzip steps were added, which have their own limits of 3 + 5 min) or all (the default; more than one call of the device tool allows, so name a part).
#
# Needs on that machine: python3 with jax[cuda], flax, optax, orbax, torch (CUDA), pytest and
# hypothesis; what it lacks travels as wheels in .whl/ (kvpress 0.5.5 and the transformers /
# tokenizers it accepts, gguf, datasets, fire, ...), installed into /tmp/site. The default
# model's GGUF (98 MB) does not travel: the timings use its random twin
# (experiments/random_twin.py; .devcarry/smollm2-twin holds its config and tokenizer, the
# weights are drawn here), whose FLOPs and bytes are the model's. Each step has its own time
# limit and writes into OUT_DIR as it goes, so a step that fails or runs out leaves the others.
set -u
OUT_DIR=${1:?usage: gpu_checks.sh OUT_DIR [kernels|models|overhead|all]}
PART=${2:-all}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/kvlab-xla-cache
TWIN=.devcarry/smollm2-twin
# The device tool returns at most 8 files from OUT_DIR: the JSON results and steps.txt go there;
# a step's log only when the step failed (all logs stay in LOG_DIR on the machine).
LOG_DIR=/tmp/kvlab-logs
mkdir -p "$LOG_DIR"
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, log in LOG_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$LOG_DIR/$name.log" 2>&1
  local rc=$?
  echo "step $name: rc $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/steps.txt"
  if [ $rc -eq 0 ]; then
    tail -n 4 "$LOG_DIR/$name.log"
  else
    tail -n 30 "$LOG_DIR/$name.log"
    cp "$LOG_DIR/$name.log" "$OUT_DIR/"
  fi
}
nvidia-smi -L | tee "$OUT_DIR/steps.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$LOG_DIR/pip.log" 2>&1 \
    || echo "pip failed" >> "$OUT_DIR/steps.txt"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tail -n 1 | tee -a "$OUT_DIR/steps.txt"
if [ "$PART" = kernels ] || [ "$PART" = all ]; then
  # 1. The kernels' test files, compiled (not interpreted) on the GPU; references at full fp32;
  #    no shrinking of a failing example (each shrink step recompiles): the first one is shown.
  JAX_DEFAULT_MATMUL_PRECISION=highest KVLAB_HYPOTHESIS_PROFILE=device step kernel_tests 240 \
    python3 -m pytest -q -p no:cacheprovider tests/test_quantized_decode_kernel.py \
    tests/test_sparse_decode_kernel.py tests/test_column_sums_kernel.py
  # 2. Decode attention over KIVI codes vs the XLA paths (issue 4's GPU figures): the default
  #    model's head shape at batch 1, and a batch large enough that the cache read, not the
  #    launch, is timed; the kernel with its default split-K partitions and with one partition,
  #    each with exact float32 and with bf16 (tensor-core) dots.
  step bench_decode 120 python3 -m experiments.bench_decode --lengths=1024,4096,32768 --reps=10 \
    --kernel_partitions=auto,1 --kernel_dot_dtypes=float32,bfloat16 \
    --out="$OUT_DIR/bench_decode_gpu.json"
  step bench_decode_b32 90 python3 -m experiments.bench_decode --batch=32 --lengths=32768 \
    --reps=10 --kernel_partitions=auto,1 --kernel_dot_dtypes=float32,bfloat16 \
    --out="$OUT_DIR/bench_decode_gpu_b32.json"
fi
if [ "$PART" != kernels ]; then
  step twin 40 python3 -m experiments.random_twin --out=$TWIN --stage=weights
fi
if [ "$PART" = models ] || [ "$PART" = all ]; then
  # 3. kvlab vs kvpress end to end and AdaKV's paged decode, on the random twin.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step vs_kvpress 140 python3 -m experiments.bench_vs_kvpress \
    --model=$TWIN --methods=snapkv,knorm --lengths=1024,2048,4096 --cases=5 --dtype=bfloat16 \
    --out="$OUT_DIR/bench_vs_kvpress_gpu.json"
  # kvlab's prefill in one 4096-token chunk instead of eight of 512 (on CPU the chunk bounds
  # memory; on a GPU the chunk loop's sequential steps may cost more than they save).
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step vs_kvpress_chunk4k 60 python3 -m \
    experiments.bench_vs_kvpress --model=$TWIN --methods=snapkv,knorm --lengths=4096 --cases=3 \
    --dtype=bfloat16 --chunk=4096 --out="$OUT_DIR/bench_vs_kvpress_chunk4k_gpu.json"
  # ... and also attention blocks of 4096 slots, a decode step's keys in one block (no inner
  #     loop: on a GPU each while-loop trip waits on the host for its predicate).
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step vs_kvpress_block4k 60 python3 -m \
    experiments.bench_vs_kvpress --model=$TWIN --methods=snapkv,knorm --lengths=4096 --cases=3 \
    --dtype=bfloat16 --chunk=4096 --attn_block_size=4096 --decode_block_mib=64 \
    --out="$OUT_DIR/bench_vs_kvpress_block4k_gpu.json"
  step sparse_decode 60 python3 -m experiments.bench_sparse_decode --model=$TWIN --length=4096 \
    --out="$OUT_DIR/bench_sparse_decode_gpu.json"
fi
if [ "$PART" = overhead ]; then
  # The column-sum kernels' tests compiled, first, so that their timing below is of a kernel that
  # was shown right on this machine (part kernels runs them with the decode kernels' tests).
  JAX_DEFAULT_MATMUL_PRECISION=highest KVLAB_HYPOTHESIS_PROFILE=device step column_sum_tests 150 \
    python3 -m pytest -q -p no:cacheprovider tests/test_column_sums_kernel.py
  # The kernels alone, plain vs Keyformer's Gumbel sums, at several block shapes: with the kernel
  # on the H200 (2026-11-27) h2o's hook added 1.9 ms to a 4k prefill and keyformer's 99 ms.
  step bench_column_sums 90 python3 -m experiments.bench_column_sums \
    --blocks=64x64,32x64,128x64,64x128,64x32 --out="$OUT_DIR/bench_column_sums_gpu.json"
fi
if [ "$PART" = overhead ] || [ "$PART" = all ]; then
  # 4. Every method's observe + compress overhead on the twin; h2o / keyformer take the fused
  #    column-sum kernels (--column_sums=kernel; "auto", the default, takes it for h2o only) ...
  #    Thirty reps: at ten (e90d9c4) the hook-free prefill's best still ranged 78-93 ms across
  #    rows, and TOVA's hook, which only copies one query per chunk, "cost" 4 ms.
  step compress 200 python3 -m experiments.bench_compress --model=$TWIN \
    --method=h2o,keyformer,tova,snapkv,pyramidkv,adakv,knorm,streaming_llm,expected_attention \
    --length=4096 --reps=30 --dtype=bfloat16 --column_sums=kernel \
    --out="$OUT_DIR/bench_compress_gpu.json"
  # ... vs the probabilities kept by the attention (the default; 67 % / 100 % on the H200) and
  # the hook's own blockwise XLA pass.
  step compress_kept 60 python3 -m experiments.bench_compress --model=$TWIN \
    --method=h2o,keyformer --length=4096 --reps=30 --dtype=bfloat16 --column_sums=kept \
    --out="$OUT_DIR/bench_compress_kept_gpu.json"
  step compress_ownpass 60 python3 -m experiments.bench_compress --model=$TWIN \
    --method=h2o,keyformer --length=4096 --reps=30 --dtype=bfloat16 --column_sums=own \
    --out="$OUT_DIR/bench_compress_ownpass_gpu.json"
  # 5. KVzip (its repeat passes are its compress) and kvzip_heads at 4k, beside knorm. A head
  #    table records its model's fingerprint, so the twin gets its own first (2 samples, 2k).
  step kvzip_table 180 python3 -m experiments.calibrate_kvzip_heads --model=$TWIN --samples=2 \
    --out="$LOG_DIR/kvzip_heads_twin.json"
  step compress_kvzip 300 python3 -m experiments.bench_compress --model=$TWIN \
    --method=kvzip,kvzip_heads:table=$LOG_DIR/kvzip_heads_twin.json,knorm --length=4096 \
    --reps=10 --dtype=bfloat16 --out="$OUT_DIR/bench_compress_kvzip_gpu.json"
fi
