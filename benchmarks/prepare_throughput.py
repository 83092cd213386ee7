"""`prepare` throughput against the `tokenizers` batch encoder on the same text, same run;
and the prepared loader's time per step against the tiny model's step time.

The corpus is the Python standard library's sources as JSON Lines (one file per record,
nothing downloaded); the tokenizer a byte-level BPE trained here on part of it. The
baseline is the texts already in memory, encoded by `Tokenizer.encode_batch_fast` with the
library's own threads on every core, ids taken out as lists: the ceiling for tokenizing,
with no reading, parsing, hashing or writing. `prepare` is timed end to end (hash and plan, parse, tokenize in
`--workers` processes, write and fsync the shards, the manifest).

    python benchmarks/prepare_throughput.py [--mb 16] [--vocab 8192] [--workers N] [--shard_mb 1] [--rounds 3]
        [--steps 20]

Prints tokens/s (and per core) of both per round, the median ratio prepare / baseline
(target >= 0.8), and
the loader's mean time per batch against the mean train step of the default (tiny) model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path


def corpus(path: Path, megabytes: float) -> list[str]:
    texts, total = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in file.parts:
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode())
        if total >= megabytes * 2**20:
            break
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def train_tokenizer(directory: Path, texts: list[str], vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts[: max(1, len(texts) // 8)], trainer)
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "add_bos_token": True, "add_eos_token": True}))


def loader_vs_step(prepared: Path, tokenizer: Path, vocab: int, steps: int, workdir: Path) -> tuple[float, float, str]:
    """Mean seconds of next(loader), and of a train step over the second half of a run (the
    trainer's own step_time_s, loader included), on the default (tiny) model."""
    from efficient_train import Trainer, get_config

    config = get_config()
    config.workdir = str(workdir)
    config.model.vocab_size = vocab
    config.data.update(source="prepared", path=str(prepared), tokenizer=str(tokenizer))
    config.train.update(steps=steps, log_every=steps // 2)
    config.checkpoint.update(every=0)
    trainer = Trainer(config)
    trainer.fit()
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    step_time = [r for r in records if "step_time_s" in r][-1]["step_time_s"]
    loader = trainer.loader
    start = time.perf_counter()
    for _ in range(steps):
        next(loader)
    shape = f"{config.train.batch_size} x {config.data.seq_len} tokens"
    return (time.perf_counter() - start) / steps, step_time, shape


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=16, help="corpus size in MiB")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--shard_mb", type=float, default=1, help="input MiB per shard (prepare's unit of work)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=20, help="train steps for the loader comparison (0: skip)")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from efficient_train.data.prepare import prepare

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = corpus(root / "corpus.jsonl", args.mb)
        train_tokenizer(root / "tok", texts, args.vocab)
        mib = (root / "corpus.jsonl").stat().st_size / 2**20
        print(f"corpus: {len(texts)} records, {mib:.1f} MiB of JSON Lines; {cores} cores; {args.workers} workers")

        tokenizer = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
        ratios = []
        for round_ in range(args.rounds):  # interleaved, so load from elsewhere hits both alike
            start = time.perf_counter()
            ids = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
            base_s = time.perf_counter() - start
            base_tokens = sum(map(len, ids))

            shutil.rmtree(root / "out", ignore_errors=True)
            start = time.perf_counter()
            manifest = prepare([str(root / "corpus.jsonl")], root / "out", tokenizer=str(root / "tok"), fmt="jsonl",
                               workers=args.workers, shard_bytes=int(args.shard_mb * 2**20), progress=False)
            ours_s = time.perf_counter() - start
            ours_tokens = manifest["totals"]["train"]["tokens"] - 2 * manifest["totals"]["train"]["documents"]
            assert ours_tokens == base_tokens, (ours_tokens, base_tokens)  # the same ids (bos/eos aside)

            for name, seconds in (("baseline encode_batch_fast", base_s), ("efficient-train prepare", ours_s)):
                rate = base_tokens / seconds
                print(f"round {round_}: {name:28s} {seconds:7.2f} s  {rate:12,.0f} tok/s  "
                      f"{rate / cores:12,.0f} tok/s/core")
            ratios.append(base_s / ours_s)
        print(f"ratio prepare / baseline: {statistics.median(ratios):.3f} median of "
              f"{', '.join(f'{r:.3f}' for r in ratios)} (target >= 0.8)")

        if args.steps:
            loader_s, step_s, shape = loader_vs_step(root / "out", root / "tok", args.vocab, args.steps, root / "run")
            print(f"tiny model, {shape}: loader {loader_s * 1e3:.2f} ms/batch, train step {step_s * 1e3:.1f} ms "
                  f"(loader share {loader_s / step_s:.1%})")


if __name__ == "__main__":
    main()
