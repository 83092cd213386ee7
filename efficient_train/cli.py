"""The `efficient-train` command: `train`, `estimate`, `prepare` and `checkpoint` tools.

    efficient-train train [--config FILE] [--config.FIELD=VALUE ...] [--workdir DIR]
                          [--coordinator HOST:PORT --num_processes N --process_id I]
                          [--devices N]
    efficient-train estimate [--config FILE] [--config.FIELD=VALUE ...] [--devices N] [--json] [--remat all|P1,P2]
    efficient-train eval --checkpoint CKPT [--data SETS] [--steps N] [--config FILE] [--config.FIELD=VALUE ...]
                          [--devices N]
    efficient-train generate --checkpoint CKPT --prompt TEXT [--prompt TEXT ...] [--tokenizer T]
                          [--max_new_tokens N] [--temperature T] [--top_p P] [--top_k K] [--seed S]
                          [--config FILE] [--config.FIELD=VALUE ...] [--devices N]
    efficient-train prepare --input FILES_OR_GLOBS --output DIR [--tokenizer T] [--format text|jsonl|parquet|chat]
                          [--field F] [--validation_fraction F] [--workers N] [--on_error fatal|skip]
    efficient-train checkpoint inspect|verify CKPT
    efficient-train checkpoint import-hf HF_DIR OUT [--param_dtype float32|bfloat16] [--no_scan_layers]
    efficient-train checkpoint export-hf CKPT OUT_DIR [--dtype float32|bfloat16] [--adapters_only]
    efficient-train checkpoint merge-lora SRC DST
    efficient-train checkpoint convert SRC DST --mesh data=2,tensor=2 [--zero_stage N]
                          [--state_format fp32|bf16|int8|fp8|int4] [--drop_optimizer] [--dtype bfloat16]

A bad config or flag prints one line naming the field and what is allowed, and exits
with status 2. jax is imported only after the flags are read, because the simulated
CPU device count (`--devices`, and for `estimate` the mesh's size) must be set before
jax starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

from efficient_train.config import (
    MAX_SIMULATED_DEVICES,
    apply_overrides,
    get_config,
    parse_mesh_flag,
    validate,
    validate_fields,
    validate_paths,
)
from efficient_train.errors import InputError, RunError
from efficient_train.models.choices import REMAT_POLICIES
from efficient_train.parallel.axes import MESH_AXES


class UsageError(InputError):
    """A command-line problem: printed as one line, exit status 2."""


def _split_overrides(extra: Sequence[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise UsageError(f"unrecognized argument {item!r}; config fields are set as --config.FIELD=VALUE")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            if not items:
                raise UsageError(f"--config.{key}: missing value")
            value = items.pop(0)
        overrides[key] = value
    return overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efficient-train", description="Distributed LLM training on JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train a model; resumes from the newest checkpoint in the work directory"),
                            ("estimate", "per-device memory of a config's train step, compile only"),
                            ("eval", "loss, perplexity and bits per byte of a checkpoint on evaluation sets"),
                            ("generate", "continue text prompts with a checkpoint's model (KV-cache decoding)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", default=None, help="a configs/*.py file (default: the tiny recipe)")
        sub.add_argument("--devices", type=int, default=None, help="simulate N CPU devices")
        if name in ("eval", "generate"):
            sub.add_argument("--checkpoint", required=True, help="a checkpoint directory (its newest step) or a step")
        if name == "eval":
            sub.add_argument("--data", default=None, help="eval.sets entries: validation, NAME=DIR[:train], "
                             "NAME=SOURCE:PATH (default: the config's eval.sets)")
            sub.add_argument("--steps", type=int, default=None, help="batches per set (0: each set whole)")
        if name == "generate":
            sub.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable: a batch)")
            sub.add_argument("--tokenizer", default=None, help="tokenizer.json or model directory (default: "
                             "data.tokenizer; empty: UTF-8 bytes)")
            sub.add_argument("--max_new_tokens", type=int, default=64)
            sub.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
            sub.add_argument("--top_p", type=float, default=1.0)
            sub.add_argument("--top_k", type=int, default=0)
            sub.add_argument("--seed", type=int, default=0)
        if name == "estimate":
            sub.add_argument("--json", action="store_true", help="print one JSON record instead of a table")
            sub.add_argument("--remat", default=None, help="a table over model.remat policies: 'all' or a "
                             "comma-separated list (one compile each)")
        if name == "train":
            sub.add_argument("--workdir", default=None, help="where metrics.jsonl (and later checkpoints) go")
            sub.add_argument("--coordinator", default="", help="host:port of process 0 for multi-process runs")
            sub.add_argument("--num_processes", type=int, default=1)
            sub.add_argument("--process_id", type=int, default=0)
    prepare = commands.add_parser("prepare", help="tokenize raw text once into token shards (parallel, resumable)")
    prepare.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    prepare.add_argument("--output", required=True, help="the prepared directory (new, empty, or one to resume)")
    prepare.add_argument("--tokenizer", default="", help="tokenizer.json or a model directory (default: bytes)")
    prepare.add_argument("--format", default="text", help="text (a document per file), jsonl, parquet, chat")
    prepare.add_argument("--field", default=None, help="the JSON field / parquet column (default: text; chat: messages)")
    prepare.add_argument("--validation_fraction", type=float, default=0.0, help="share of documents held out")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: the cores available)")
    prepare.add_argument("--on_error", default="fatal", help="a bad record: fatal (default) or skip (counted)")
    prepare.add_argument("--shard_bytes", type=int, default=None, help="input bytes per shard (default 16 MiB)")
    checkpoint = commands.add_parser("checkpoint", help="inspect, verify or convert a saved checkpoint")
    tools = checkpoint.add_subparsers(dest="tool", required=True)
    ckpt = ("ckpt", "a checkpoint directory or one step in it")
    for name, help_text, positionals in (
        ("inspect", "table of leaves, shapes, dtypes, bytes; step, mesh at save, formats", (ckpt,)),
        ("verify", "recompute every leaf's fingerprint; exit 1 naming damaged leaves", (ckpt,)),
        ("import-hf", "Hugging Face Llama directory (safetensors) -> params-only checkpoint at step 0",
         (("hf_dir", "a directory with config.json and model*.safetensors"),
          ("out", "checkpoint directory to create the step in"))),
        ("export-hf", "checkpoint -> Hugging Face Llama directory (safetensors shards + config.json)",
         (ckpt, ("out_dir", "a new or empty directory"))),
        ("convert", "rewrite a checkpoint for another mesh, optimizer state format or dtype, tensor by tensor",
         (("src", "a checkpoint directory or one step in it"), ("dst", "checkpoint directory to write the step into"))),
        ("merge-lora", "LoRA checkpoint -> full params-only checkpoint (base + alpha/rank * A @ B)",
         (("src", "a LoRA checkpoint directory or one step in it"), ("dst", "checkpoint directory to write the step into"))),
    ):
        sub = tools.add_parser(name, help=help_text)
        for arg, arg_help in positionals:
            sub.add_argument(arg, help=arg_help)
        if name == "import-hf":
            sub.add_argument("--param_dtype", default="float32", help="float32 (default) or bfloat16 master weights")
            sub.add_argument("--no_scan_layers", dest="scan_layers", action="store_false",
                             help="store layers as blocks/0/... (for model.scan_layers=False)")
        if name == "convert":
            sub.add_argument("--mesh", required=True, help="target mesh, e.g. data=2,tensor=2 (unnamed axes are 1)")
            sub.add_argument("--zero_stage", type=int, default=None, help="target ZeRO stage (default: as saved)")
            sub.add_argument("--state_format", default=None, help="re-encode optimizer moments: fp32|bf16|int8|fp8|int4")
            sub.add_argument("--drop_optimizer", action="store_true", help="write parameters only")
            sub.add_argument("--dtype", default=None, help="cast parameters: float32|bfloat16")
        if name == "export-hf":
            sub.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the checkpoint's)")
            sub.add_argument("--adapters_only", action="store_true",
                             help="a LoRA checkpoint's adapters alone, in the PEFT layout (adapter_config.json + "
                                  "adapter_model.safetensors); without it a LoRA checkpoint exports merged")
    return parser


def _checkpoint(args: argparse.Namespace) -> int:
    """The checkpoint tools. Each reports its failures as InputError/RunError lines; an
    OSError or MemoryError that still escapes one becomes a one-line RunError (exit 1)."""
    from efficient_train.checkpoint.metadata import CheckpointReadError
    from efficient_train.tools.report import inspect_text, verify_text

    try:
        if args.tool == "import-hf":
            from efficient_train.tools import hf

            step_dir = hf.import_hf(args.hf_dir, args.out, param_dtype=args.param_dtype, scan_layers=args.scan_layers)
            print(f"wrote {step_dir}: parameters only, step 0")
            tokenizer_dir, side = hf.side_files(step_dir)
            tokenizer = f" --config.data.tokenizer={tokenizer_dir}" if "tokenizer.json" in side else ""
            print("fine-tune from it with: efficient-train train "
                  f"--config.checkpoint.dir={os.path.dirname(step_dir)} {' '.join(hf.train_overrides(step_dir))}"
                  f"{tokenizer}")
            return 0
        if args.tool == "export-hf":
            from efficient_train.tools import hf

            files = hf.export_hf(args.ckpt, args.out_dir, dtype=args.dtype, adapters_only=args.adapters_only)
            what = "PEFT adapters: " + " and ".join(files) if args.adapters_only else \
                f"config.json and {len(files)} safetensors file(s)"
            print(f"wrote {os.path.abspath(args.out_dir)}: {what}")
            return 0
        if args.tool == "merge-lora":
            from efficient_train.tools.lora import merge_lora

            step_dir = merge_lora(args.src, args.dst)
            print(f"wrote {step_dir}: the base with the adapters merged in, parameters only")
            return 0
        if args.tool == "convert":
            mesh = parse_mesh_flag(args.mesh)
            _simulate_devices(math.prod(mesh.values()))
            from efficient_train.tools.convert import convert

            step_dir = convert(args.src, args.dst, mesh=mesh, zero_stage=args.zero_stage,
                               state_format=args.state_format, drop_optimizer=args.drop_optimizer, dtype=args.dtype)
            print(f"wrote {step_dir}")
            return 0
        if args.tool == "inspect":
            print(inspect_text(args.ckpt))
            return 0
        ok, text = verify_text(args.ckpt)
        print(text)
        return 0 if ok else 1
    except OSError as error:  # not proven damage: the file system refused
        where = f" ({error.filename})" if error.filename else ""
        raise CheckpointReadError(f"checkpoint {args.tool}: {error.strerror or error}{where}") from None
    except MemoryError:
        raise CheckpointReadError(f"checkpoint {args.tool}: out of host memory") from None


def _prepare(args: argparse.Namespace) -> int:
    from efficient_train.data.prepare import DEFAULT_SHARD_BYTES, prepare

    try:
        manifest = prepare(args.input, args.output, tokenizer=args.tokenizer, fmt=args.format, field=args.field,
                           validation_fraction=args.validation_fraction, workers=args.workers,
                           on_error=args.on_error, shard_bytes=args.shard_bytes or DEFAULT_SHARD_BYTES)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: the committed shards are kept; rerun the same command to resume\n")
        return 130
    totals = manifest["totals"]
    print(f"prepared {args.output}: " + "; ".join(
        f"{split} {totals[split]['documents']} documents, {totals[split]['tokens']} tokens"
        for split in ("train", "validation")) + f"; {totals['skipped']} bad records skipped")
    return 0


def with_device_count(xla_flags: str, count: int | None) -> str:
    """`xla_flags` with its simulated CPU device count replaced by `count` (None: removed)."""
    flag = "--xla_force_host_platform_device_count"
    kept = [f for f in xla_flags.split() if not f.startswith(flag)]
    return " ".join(kept + ([f"{flag}={count}"] if count is not None else []))


def _simulate_devices(count: int) -> None:
    if not 1 <= count <= MAX_SIMULATED_DEVICES:  # jax would take minutes to start them, then fail to compile
        raise UsageError(f"devices: {count} simulated CPU devices asked for; the CPU backend compiles for "
                         f"1 to {MAX_SIMULATED_DEVICES}")
    os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), count)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _train(args: argparse.Namespace, config) -> int:
    from efficient_train.parallel.mesh import DistributedArgs, distributed_args_from_env, initialize_distributed

    initialize_distributed(distributed_args_from_env(DistributedArgs(args.coordinator, args.num_processes, args.process_id)))
    import jax

    from efficient_train.train import Trainer
    from efficient_train.train.library_log import library_output_to_file

    with library_output_to_file(config.workdir, jax.process_index()):
        trainer = Trainer(config)
        final = trainer.fit()
    if trainer.is_main:
        print(json.dumps({"final": final, "stop_reason": trainer.stop_reason}))
    return 130 if trainer.stop_reason == "SIGINT" else 0  # a shell's convention for a run stopped by Ctrl-C


def _remat_policies(value: str) -> tuple[str, ...]:
    """--remat: 'all' or a comma-separated list of model.remat policies."""
    if value.strip() == "all":
        return REMAT_POLICIES
    policies = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in policies if name not in REMAT_POLICIES]
    if unknown or not policies:
        raise UsageError(f"--remat: {value!r}; give 'all' or policies from {', '.join(REMAT_POLICIES)}, comma-separated")
    return policies


def _estimate(config, as_json: bool, remat: str | None) -> int:
    from efficient_train.train.estimate import estimate_memory, estimate_policies, format_estimate, format_policy_table

    if remat is not None:
        rows = estimate_policies(config, _remat_policies(remat))
        print(json.dumps(rows) if as_json else format_policy_table(config, rows))
        return 0
    estimate = estimate_memory(config)
    print(json.dumps(estimate) if as_json else format_estimate(config, estimate))
    return 0


def _eval(args: argparse.Namespace, config) -> int:
    from efficient_train.data.eval_sets import check_eval_sets
    from efficient_train.tools.checkpoint_model import load_checkpoint_model
    from efficient_train.train.console import eval_line
    from efficient_train.train.evaluation import Evaluator
    from efficient_train.train.training_setup import lm_batch_shapes

    if args.data is not None:
        config.eval.sets = args.data
    if args.steps is not None:
        config.eval.steps = args.steps
    validate_fields(config)
    if not config.eval.sets.strip():
        raise UsageError("--data: no evaluation set; give e.g. --data validation (data.path's validation split), "
                         "--data NAME=DIR (a prepared directory) or --data NAME=text:PATH")
    check_eval_sets(config.eval.sets, config.data)
    loaded = load_checkpoint_model(args.checkpoint, config)
    abstract_batch = loaded.setup.abstract_batch(lm_batch_shapes(loaded.config))
    record = Evaluator.from_config(loaded.config, loaded.setup, abstract_batch).run(loaded.params, loaded.step)
    print(eval_line(record))
    print(json.dumps({"checkpoint": loaded.step_dir, **record}))
    return 0


def _generate(args: argparse.Namespace, config) -> int:
    from efficient_train.generate import SamplingOptions, complete
    from efficient_train.tools.checkpoint_model import load_checkpoint_model

    options = SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    options.check()  # before the checkpoint is read
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens: {args.max_new_tokens} must be >= 1")
    tokenizer = config.data.tokenizer if args.tokenizer is None else args.tokenizer
    loaded = load_checkpoint_model(args.checkpoint, config)
    texts = complete(loaded.module(), args.prompt, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                     options=options, seed=args.seed)
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        print(("" if i == 0 else "\n---\n") + prompt + text)
    return 0


def _device_count(args: argparse.Namespace, config) -> int | None:
    """The simulated device count: --devices, or for `estimate` the mesh's size; None: jax's own."""
    devices = args.devices
    if devices is None and args.command == "estimate":
        sizes = [config.mesh[axis] for axis in MESH_AXES]
        if -1 in sizes:
            raise UsageError("mesh: estimate needs every mesh axis sized (no -1), or --devices N")
        devices = math.prod(sizes)
        if devices > MAX_SIMULATED_DEVICES:
            raise UsageError(f"mesh: {' x '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))} = {devices} devices; "
                             f"estimate simulates at most {MAX_SIMULATED_DEVICES} CPU devices")
    if devices is not None and not 1 <= devices <= MAX_SIMULATED_DEVICES:
        raise UsageError(f"--devices: {devices} must lie in [1, {MAX_SIMULATED_DEVICES}]; the CPU backend "
                         f"compiles for at most {MAX_SIMULATED_DEVICES} simulated devices")
    return devices


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        if args.command in ("checkpoint", "prepare"):
            if extra:
                raise UsageError(f"unrecognized arguments {' '.join(extra)}")
            return _checkpoint(args) if args.command == "checkpoint" else _prepare(args)
        config = get_config(args.config)
        apply_overrides(config, _split_overrides(extra))
        if args.command == "train" and args.workdir is not None:
            config.workdir = args.workdir
        # Everything that can be checked without jax or the disk is checked before either is touched.
        validate_fields(config)
        if args.command == "estimate" and args.remat is not None:
            _remat_policies(args.remat)
        processes = 1
        if args.command == "train":
            from efficient_train.parallel.mesh import DistributedArgs, distributed_args_from_env

            processes = distributed_args_from_env(
                DistributedArgs(args.coordinator, args.num_processes, args.process_id)).num_processes
        devices = _device_count(args, config)
        if devices is not None:
            validate(config, devices * processes, check_paths=False)  # the mesh fits, before jax starts
            _simulate_devices(devices)
        if args.command == "train":
            validate_paths(config)  # os.stat only; before the backend starts or anything is written
        if args.command in ("eval", "generate"):
            return _eval(args, config) if args.command == "eval" else _generate(args, config)
        return _train(args, config) if args.command == "train" else _estimate(config, args.json, args.remat)
    except RunError as error:  # not bad input: the disk, the filesystem or the data on it failed
        from efficient_train.train.library_log import details_hint

        # Our line starts a line of its own (a progress bar may be mid-line), in one write.
        sys.stderr.write(f"\nerror: {error}{details_hint()}\n")
        sys.stderr.flush()
        return 1
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; a save in flight was awaited
        sys.stderr.write("\naborted by a second Ctrl-C; the newest saved step is what a rerun resumes\n")
        return 130


def run() -> None:
    """The console entry point: `main`, then an exit that library threads cannot hold up.

    After a failure (its line printed, our own saves awaited), a library thread left
    waiting, such as an Orbax commit that can never finish on a read-only disk, would
    keep the interpreter from exiting; the process ends at once instead.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
