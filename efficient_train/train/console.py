"""What a run prints while it trains: a progress bar and one line per logged step (process 0 only).

Kept apart from the loop so the loop reads as its duties, and so the format of the
console lines lives in one place: `step | loss | grad_norm | lr | tok/s` for a training
record, `eval step | <set> loss, ppl, bpb | ...` for an evaluation's. It is one sink of
the record stream (records.py). On other processes the display is disabled and prints nothing.
"""
from __future__ import annotations

from typing import Any

from tqdm import tqdm


class ConsoleProgress:
    """A tqdm bar over `total` steps starting at `initial`, and the per-log-step line."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True)

    def advance(self) -> None:
        self._bar.update(1)

    def write(self, record: dict[str, Any]) -> None:
        """A record of the stream: a training or evaluation record gets its line; events and the
        startup record are not shown (metrics.jsonl holds them)."""
        if "event" in record:
            return
        if "loss" in record:
            self.report(record)
        elif self.enabled:
            self._bar.write(eval_line(record))

    def report(self, record: dict[str, Any]) -> None:
        """Show a logged step's record: the loss on the bar, and one line above it."""
        self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.enabled:
            self._bar.write(
                f"step {record['step']:>6} | loss {record['loss']:.4f} | grad_norm {record['grad_norm']:.3f} | "
                f"lr {record['lr']:.2e} | {record['tokens_per_sec']:.0f} tok/s"
            )

    def close(self) -> None:
        self._bar.close()


def eval_line(record: dict[str, Any]) -> str:
    """`eval step N | <set> loss L ppl P bpb B | ...` of an evaluation record."""
    parts = [f"eval step {record['step']:>6}"]
    names = [key[len("eval/"):-len("/loss")] for key in record if key.startswith("eval/") and key.endswith("/loss")]
    for name in names:
        text = f"{name} loss {_number(record[f'eval/{name}/loss'], '.4f')} ppl {_number(record[f'eval/{name}/perplexity'], '.2f')}"
        if f"eval/{name}/bits_per_byte" in record:
            text += f" bpb {_number(record[f'eval/{name}/bits_per_byte'], '.4f')}"
        parts.append(text)
    return " | ".join(parts)


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
