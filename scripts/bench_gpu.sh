#!/usr/bin/env bash
# Every GPU measurement in one go, after a check that the GPU's checkpoint fingerprints
# equal the host's; prints a short table last, full logs under $OUT (or /tmp); exits 1 if
# any run failed.
#
#   bash scripts/bench_gpu.sh
#   BENCH_ONLY="mfu_llama1b_b8_pallas attention" bash scripts/bench_gpu.sh   # a subset
#   BENCH_ONLY=attention_sweep bash scripts/bench_gpu.sh   # opt-in runs must be named
#
# Runs from the source tree (PYTHONPATH), so it works on an image whose jax is already
# installed (jax 0.10 or 0.11). Wheels of pure-Python dependencies the image lacks may be
# placed in .wheels/ and are installed with --no-deps first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/efficient_train_bench}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
if compgen -G ".wheels/*.whl" >/dev/null; then
  $py -m pip install --quiet --no-deps --no-index .wheels/*.whl >"$out/wheels.log" 2>&1 || cat "$out/wheels.log"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/env.txt"

OPT_IN=" attention_sweep "  # run only when BENCH_ONLY names them
failed=""  # the runs that failed; the script exits 1 if any did
run() {  # name, then the command; BENCH_ONLY="name1 name2" runs a subset
  local name=$1; shift
  if [[ -n "${BENCH_ONLY:-}" && " $BENCH_ONLY " != *" $name "* ]]; then return; fi
  if [[ "$OPT_IN" == *" $name "* && " ${BENCH_ONLY:-} " != *" $name "* ]]; then return; fi
  echo "== $name: $*" | tee -a "$out/summary.txt"
  if "$@" >"$out/$name.log" 2>&1; then
    grep -v "it/s" "$out/$name.log" | tail -4 | tee -a "$out/summary.txt"
  else
    echo "FAILED (exit $?)" | tee -a "$out/summary.txt"; tail -25 "$out/$name.log"
    failed="$failed $name"
  fi
}

# 0. Device fingerprints equal host fingerprints on the GPU, for every dtype a checkpoint
#    holds (else every restore of a checkpoint saved here would look damaged). Seconds.
run fingerprints env JAX_PLATFORMS=cuda $py scripts/check_fingerprints.py

# 1. MFU of llama_1b-sized training on one GPU (bf16 compute, fp32 master weights).
run mfu_llama1b_b8_savedots $py benchmarks/mfu.py --config configs/llama_1b.py --steps 15 \
  --config.train.batch_size=8 --config.zero_stage=0 --config.model.remat=save_dots
run mfu_llama1b_b8_pallas $py benchmarks/mfu.py --config configs/llama_1b.py --steps 15 \
  --config.train.batch_size=8 --config.zero_stage=0 --config.model.remat=save_dots --config.attention.impl=pallas
run mfu_llama1b_b8_pallas_norm $py benchmarks/mfu.py --config configs/llama_1b.py --steps 15 \
  --config.train.batch_size=8 --config.zero_stage=0 --config.model.remat=save_dots --config.attention.impl=pallas \
  --config.norm.impl=pallas
run mfu_llama1b_b8_xla $py benchmarks/mfu.py --config configs/llama_1b.py --steps 15 \
  --config.train.batch_size=8 --config.zero_stage=0 --config.model.remat=save_dots --config.attention.impl=xla
# 2. Trainer overhead against a hand-written jit + optax step, same model on the GPU.
run overhead_gpt2_small $py benchmarks/trainer_overhead.py --config configs/gpt2_small.py --steps 20 \
  --config.train.batch_size=16 --config.data.source=synthetic

# 3. Flash attention kernel against cuDNN and torch SDPA (checks correctness on the GPU first).
run attention $py benchmarks/attention.py
#    Block-size sweep of our kernel (causal, bf16; SWEEP_FWD/SWEEP_BWD in the script), opt-in:
#    BENCH_ONLY=attention_sweep. The backward tiles are where the gap to cuDNN is.
run attention_sweep bash -c "$py benchmarks/attention.py --sweep 4096 && $py benchmarks/attention.py --sweep 8192"
run rms_norm $py benchmarks/rms_norm.py

# 4. Compressed optimizer states (issue 3): fused Pallas update vs XLA path vs optax.adamw fp32
#    on a 1B-parameter tree; then llama_1b training with int8 states (compare with mfu_llama1b_b8_savedots).
run optimizer_update_1b $py benchmarks/optimizer_update.py --params 1e9 --formats int8,fp8,int4 --steps 20 --rounds 3
run mfu_llama1b_b8_savedots_int8 $py benchmarks/mfu.py --config configs/llama_1b.py --steps 15 \
  --config.train.batch_size=8 --config.zero_stage=0 --config.model.remat=save_dots --config.optimizer.state_format=int8

# 5. Checkpoint I/O on the host (CPU devices; the GPU machine's many idle cores make a quiet
#    place to time it): save vs plain write, async blocking, cross-mesh restore; convert's peak memory.
run checkpoint_io env JAX_PLATFORMS=cpu $py benchmarks/checkpoint_io.py --devices 8 --megabytes 1024
#    The same save from the GPU's memory (fingerprints as device reductions, Orbax's copy over PCIe).
run checkpoint_io_gpu env JAX_PLATFORMS=cuda $py benchmarks/checkpoint_io.py --devices 1 --megabytes 4096
run convert_memory env JAX_PLATFORMS=cpu $py benchmarks/convert_memory.py

# ---- 6. Remat and offload policies (issue 18b): activation offload vs recompute ------------
#    benchmarks/remat_offload.py: per policy, the largest batch that fits (each try in its own
#    process), step time, peak bytes, host buffers (S(5)) in the compiled step, first losses.
#    About 1-1.5 min per (policy, batch) try on llama_1b; at most 9 tries here.
#    BENCH_SMOKE=1 runs this section with tiny settings (checks it end to end on a CPU):
#      BENCH_SMOKE=1 BENCH_ONLY=remat_offload_llama1b bash scripts/bench_gpu.sh
if [[ -n "${BENCH_SMOKE:-}" ]]; then
  remat_args=(--batches 2,4 --steps 2 --warmup 1 --policies full,save_attention,offload_attention)
else
  remat_args=(--config configs/llama_1b.py --config.zero_stage=0 --batches 8,12,16 --steps 10 --warmup 2
              --policies save_dots,offload_dots,full)
fi
run remat_offload_llama1b $py benchmarks/remat_offload.py "${remat_args[@]}"
# ---- end of section 6 ------------------------------------------------------------------------

echo "=============== summary ==============="
cat "$out/summary.txt"
if [[ -n "$failed" ]]; then
  echo "FAILED:$failed"
  exit 1
fi
