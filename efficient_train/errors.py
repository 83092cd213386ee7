"""The two kinds of error a user sees, and how the command line reports them.

Every failure the user can cause or meet is raised as one of these, phrased as one
line that names the field, file or position and what is allowed:

- `InputError`: the input is wrong (a config field, a flag, a data file, a checkpoint's
  metadata, a Hugging Face directory). Nothing was changed on disk. Exit status 2.
- `RunError`: the input was fine but the run could not go on (a write failed, every
  checkpoint is damaged, another process holds the work directory). Exit status 1.

Both are plain Python: this module imports nothing, so the CLI can catch them before it
knows whether the command needs jax. Specific errors subclass these (ConfigError,
CheckpointError, DataError, ...); callers catch the specific ones, the CLI catches these.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input, phrased as one line naming what is wrong and what is allowed (exit 2)."""


class RunError(RuntimeError):
    """A run that cannot continue for a reason other than bad input, as one line (exit 1)."""


class ConfigError(InputError):
    """A configuration problem, phrased as one line naming the field (config.validate, ModelConfig)."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of `error`'s message (at most `limit` characters), or its type's name
    when it has no message: how a library's multi-line error enters one of our lines."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
