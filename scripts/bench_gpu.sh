#!/usr/bin/env bash
# Every GPU measurement in one go, after a check that the GPU's checkpoint fingerprints
# equal the host's; prints a short table last, full logs under $OUT (or /tmp); exits 1 if
# any run failed.
#
#   bash scripts/bench_gpu.sh
#   BENCH_ONLY="mfu_llama1b_b8_pallas attention" bash scripts/bench_gpu.sh   # a subset
#   BENCH_ONLY=attention_sweep bash scripts/bench_gpu.sh   # opt-in runs must be named
#   BENCH_ONLY="fp8_gemm fp8_8bwidth_bf16 fp8_8bwidth_fp8 loss_full_llama1b loss_chunked_llama1b \
#     chunked_loss_sweep" bash scripts/bench_gpu.sh   # section 6 alone (issue 18), about 8 minutes
#   BENCH_ONLY=fp8_curves_8bwidth bash scripts/bench_gpu.sh   # opt-in: 2 x 200 steps, about 6 minutes
#   BENCH_ONLY="moe_pallas moe_capacity moe8_pallas moe8_ragged_dot" bash scripts/bench_gpu.sh   # section 8
#     alone (issue 19), about 6 minutes
#   BENCH_SMOKE=1 BENCH_ONLY="<the same names>" bash scripts/bench_gpu.sh   # sections 6-8 on a CPU, tiny
#     settings (checks the plumbing, not the speed: run it before spending GPU time)
#
# A lent GPU gives a session 15 minutes of device time in all, so the runs come in two
# prepared plans of about 8-10 minutes each (run the first; the second if time is left):
#   BENCH_PLAN=first bash scripts/bench_gpu.sh    # fingerprints; llama_1b MFU with the chunked loss (the
#     default) and with the whole-logits loss; FP8 vs bf16 at llama_8b widths; MoE: the Pallas
#     grouped matmul at 128 experts, and against ragged_dot at 8
#   BENCH_PLAN=second bash scripts/bench_gpu.sh   # attention table; llama_1b MFU with our attention
#     kernel; offload vs recompute; MoE capacity dispatch; the grouped matmul's tiles; the chunked
#     loss over vocabularies
#   BENCH_SMOKE=1 BENCH_PLAN=first bash scripts/bench_gpu.sh   # the same on a CPU, tiny (no fingerprints)
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
smoke=${BENCH_SMOKE:-}
case "${BENCH_PLAN:-}" in
  first) BENCH_ONLY="loss_chunked_llama1b loss_full_llama1b fp8_8bwidth_bf16 fp8_8bwidth_fp8 moe_pallas moe8_pallas
                     moe8_ragged_dot"
         [[ -n "$smoke" ]] || BENCH_ONLY="fingerprints $BENCH_ONLY" ;;
  second) BENCH_ONLY="attention mfu_llama1b_b8_pallas remat_offload_llama1b moe_capacity grouped_matmul
                      chunked_loss_sweep" ;;
  "") ;;
  *) echo "BENCH_PLAN: '$BENCH_PLAN' is not one of first, second" >&2; exit 2 ;;
esac
BENCH_ONLY=$(echo ${BENCH_ONLY:-})  # one line, single spaces
if [[ -n "$smoke" ]]; then export JAX_PLATFORMS=cpu; fi
{
  [[ -n "$smoke" ]] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/env.txt"

OPT_IN=" attention_sweep fp8_curves_8bwidth "  # run only when BENCH_ONLY names them
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

# 6. Issue 18: FP8 matmuls and the vocabulary-chunked loss. Names (for BENCH_ONLY):
#    fp8_gemm fp8_8bwidth_bf16 fp8_8bwidth_fp8 fp8_curves_8bwidth loss_full_llama1b loss_chunked_llama1b
#    chunked_loss_sweep. Under BENCH_SMOKE=1 the same commands run with a tiny model on the CPU.
if [[ -n "$smoke" ]]; then
  few=(--steps 2 --warmup 1)
  tiny=(--config.model.vocab_size=40960 --config.model.hidden_size=128 --config.model.intermediate_size=256
        --config.model.num_layers=2 --config.model.num_heads=4 --config.model.num_kv_heads=2
        --config.model.head_dim=32 --config.data.seq_len=64 --config.train.batch_size=2)
  gemm=(--tokens 256 --hidden 256 --intermediate 512 --kv 64 --steps 2)
  curve=(--steps 4 --every 2)
  sweep=(--tokens 256 --hidden 64 --vocabs 2048,40960 --chunk 8192 --steps 2)
else
  few=(--steps 10) tiny=() gemm=() curve=(--steps 200 --every 10)
  sweep=(--tokens 16384 --hidden 2048 --vocabs 8192,16384,32768,65536,128256 --chunk 8192 --dtype bfloat16)
fi
#    FP8 vs bf16 on a llama_8b-width model with 4 layers (fits one H100): the projections' GEMMs
#    alone, then training tokens/s (look for __cublas$lt$matmul$f8 in custom_calls), then (opt-in,
#    a call of its own: it takes about as long as the rest of the section) 200-step loss curves.
run fp8_gemm $py benchmarks/fp8_matmul.py "${gemm[@]}"
width8b=(--config configs/llama_8b.py --config.model.num_layers=4 --config.train.batch_size=4 --config.data.seq_len=2048
         --config.train.grad_accum=1 --config.zero_stage=0 --config.mesh.data=1 --config.model.remat=save_dots)
run fp8_8bwidth_bf16 $py benchmarks/mfu.py "${width8b[@]}" "${few[@]}" "${tiny[@]}" --config.model.matmul_precision=bf16
run fp8_8bwidth_fp8 $py benchmarks/mfu.py "${width8b[@]}" "${few[@]}" "${tiny[@]}" --config.model.matmul_precision=fp8
run fp8_curves_8bwidth $py benchmarks/loss_curves.py "${width8b[@]}" "${curve[@]}" "${tiny[@]}" \
  --field model.matmul_precision --values bf16,fp8
#    The whole-logits loss against the chunked one (the default at this vocabulary) on llama_1b:
#    step time and per-device memory; then the loss alone over vocabulary sizes (the auto threshold).
llama1b=(--config configs/llama_1b.py --config.train.batch_size=8 --config.zero_stage=0 --config.mesh.data=1
         --config.model.remat=save_dots)
run loss_full_llama1b $py benchmarks/mfu.py "${llama1b[@]}" "${few[@]}" "${tiny[@]}" --config.train.loss_chunk=0
run loss_chunked_llama1b $py benchmarks/mfu.py "${llama1b[@]}" "${few[@]}" "${tiny[@]}" --config.train.loss_chunk=-1
run chunked_loss_sweep $py benchmarks/chunked_loss.py "${sweep[@]}"

# ---- 7. Remat and offload policies (issue 18b): activation offload vs recompute ------------
#    benchmarks/remat_offload.py: per policy, the largest batch that fits (each try in its own
#    process), step time, peak bytes, host buffers (S(5)) in the compiled step, first losses.
#    About 1-1.5 min per (policy, batch) try on llama_1b; at most 9 tries here.
#    BENCH_SMOKE=1 runs this section with tiny settings (checks it end to end on a CPU):
#      BENCH_SMOKE=1 BENCH_ONLY=remat_offload_llama1b bash scripts/bench_gpu.sh
if [[ -n "$smoke" ]]; then
  remat_args=(--batches 2,4 --steps 2 --warmup 1 --policies full,save_attention,offload_attention)
else
  remat_args=(--config configs/llama_1b.py --config.zero_stage=0 --batches 8,12,16 --steps 10 --warmup 2
              --policies save_dots,offload_dots,full)
fi
run remat_offload_llama1b $py benchmarks/remat_offload.py "${remat_args[@]}"
# ---- end of section 7 ------------------------------------------------------------------------

# ---- 8. Mixture of Experts (issue 19): the Pallas grouped matmul, ragged_dot, capacity dispatch ----
#    Qwen3-30B-A3B's widths (128 experts of 768, 8 per token, hidden 2048) with 2 layers on one
#    GPU (1.87B parameters, 21 GiB of fp32 params + Adam), bf16, 4 x 2048 tokens: tokens/s and MFU of
#    the active parameters (ModelConfig.flops_per_token), dropless through the Pallas kernel
#    (moe.impl=pallas; estimate on the CPU: temp 22.2 GiB) against a [experts, capacity, hidden]
#    buffer at capacity factor 1.25. ragged_dot is not run at 128 experts: XLA expands it densely
#    over the groups (estimate: temp 307.8 GiB). Then 8 experts of 768, 2 per token, where both fit:
#    the kernel against ragged_dot. About 1-2 minutes each.
#      BENCH_SMOKE=1 BENCH_ONLY="moe_pallas moe_capacity moe8_pallas moe8_ragged_dot grouped_matmul" \
#        bash scripts/bench_gpu.sh
moe_args=(--config configs/qwen3_30b_a3b.py --config.model.num_layers=2 --config.mesh.expert=1 --config.mesh.data=1
          --config.zero_stage=0 --config.train.batch_size=4 --config.train.grad_accum=1 --config.data.seq_len=2048)
moe8=(--config.model.num_experts=8 --config.model.experts_per_token=2)
if [[ -n "$smoke" ]]; then
  moe_args+=("${tiny[@]}" --config.model.num_experts=8 --config.model.experts_per_token=2
             --config.model.moe_intermediate_size=64)
  moe8=(--config.model.num_experts=4)
fi
run moe_pallas $py benchmarks/mfu.py "${moe_args[@]}" "${few[@]}" --config.moe.impl=pallas
run moe_capacity $py benchmarks/mfu.py "${moe_args[@]}" "${few[@]}" --config.model.capacity_factor=1.25
run moe8_pallas $py benchmarks/mfu.py "${moe_args[@]}" "${moe8[@]}" "${few[@]}" --config.moe.impl=pallas
run moe8_ragged_dot $py benchmarks/mfu.py "${moe_args[@]}" "${moe8[@]}" "${few[@]}" --config.moe.impl=xla
#    The grouped matmul alone at Qwen3-30B-A3B's widths: the kernel at several tile sizes (the
#    default tiles come from here), and ragged_dot at 8 groups. Under a minute.
run grouped_matmul $py benchmarks/grouped_matmul.py ${smoke:+--cpu-smoke}
# ---- end of section 8 ------------------------------------------------------------------------

echo "=============== summary ==============="
cat "$out/summary.txt"
if [[ -n "$failed" ]]; then
  echo "FAILED:$failed"
  exit 1
fi
