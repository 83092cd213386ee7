"""What a run prints while it trains: a progress bar and one line per logged step (process 0 only).

Kept apart from the loop so the loop reads as its duties, and so the format of the
console line lives in one place: `step | loss | grad_norm | lr | tok/s`. On other
processes the display is disabled and prints nothing.
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
