#!/bin/bash
# The checks and benchmarks that need an accelerator, as one script for a lent GPU machine
# (the `device` tool: one call of about 8 minutes). From the repo root:
#
#   KVLAB_GIT_REV=$(git rev-parse --short HEAD) bash experiments/gpu_checks.sh OUT_DIR
#
# Needs on that machine: python3 with jax[cuda], flax, optax, orbax, torch (CUDA), pytest and
# hypothesis; what it lacks travels as wheels in .whl/ (kvpress 0.5.5 and the transformers /
# tokenizers it accepts, gguf, datasets, fire, ...), installed into /tmp/site. The default
# model's GGUF (98 MB) does not travel: the timings use its random twin
# (experiments/random_twin.py; .devcarry/smollm2-twin holds its config and tokenizer, the
# weights are drawn here), whose FLOPs and bytes are the model's. Each step has its own time
# limit and writes into OUT_DIR as it goes, so a step that fails or runs out leaves the others.
set -u
OUT_DIR=${1:?usage: gpu_checks.sh OUT_DIR}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/kvlab-xla-cache
TWIN=.devcarry/smollm2-twin
step() {  # step NAME SECONDS CMD...: runs CMD under a time limit, log in OUT_DIR/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "step $name: rc $rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT_DIR/steps.txt"
  tail -n 4 "$OUT_DIR/$name.log"
}
nvidia-smi -L | tee "$OUT_DIR/steps.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$OUT_DIR/pip.log" 2>&1 || echo "pip failed" >> "$OUT_DIR/steps.txt"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tail -n 1 | tee -a "$OUT_DIR/steps.txt"
# 1. Decode-attention kernels against the XLA paths (issue 4's GPU figures): the default model's
#    head shape at batch 1, and a batch large enough that the cache read, not the launch, is timed.
step bench_decode 60 python3 -m experiments.bench_decode --reps=20 --out="$OUT_DIR/bench_decode_gpu.json"
step bench_decode_b32 60 python3 -m experiments.bench_decode --batch=32 --lengths=32768 \
  --reps=10 --out="$OUT_DIR/bench_decode_gpu_b32.json"
# 2. The kernels' test files, compiled (not interpreted) on the GPU; references at full fp32.
JAX_DEFAULT_MATMUL_PRECISION=highest step kernel_tests 110 python3 -m pytest -q -p no:cacheprovider \
  tests/test_quantized_decode_kernel.py tests/test_sparse_decode_kernel.py
# 3. kvlab vs kvpress end to end, and the observe + compress overhead, on the random twin.
step twin 40 python3 -m experiments.random_twin --out=$TWIN --stage=weights
XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 step vs_kvpress 140 python3 -m experiments.bench_vs_kvpress \
  --model=$TWIN --methods=snapkv,knorm --lengths=1024,4096 --cases=3 --dtype=bfloat16 \
  --out="$OUT_DIR/bench_vs_kvpress_gpu.json"
step compress 90 python3 -m experiments.bench_compress --model=$TWIN --method=h2o,keyformer,snapkv \
  --length=4096 --reps=3 --dtype=bfloat16 --out="$OUT_DIR/bench_compress_gpu.json"
step sparse_decode 60 python3 -m experiments.bench_sparse_decode --model=$TWIN --length=4096 \
  --out="$OUT_DIR/bench_sparse_decode_gpu.json"
