"""`memory_record`: the per-device bytes of a compiled train step.

Shared by the trainer's startup record and `estimate`, so both report the same
numbers computed the same way. Parameter and optimizer-state bytes follow from the
shardings (`sharding.per_device_bytes`); temporary and total bytes are XLA's
`memory_analysis()` of the compiled program.
"""
from __future__ import annotations

from typing import Any

from efficient_train.parallel.sharding import per_device_bytes
from efficient_train.train.training_setup import TrainSetup


def memory_record(setup: TrainSetup, compiled: Any) -> dict[str, int]:
    """Per-device bytes of the compiled step: state from its shardings, temp from XLA."""
    analysis = compiled.memory_analysis()
    # A LoRA run's frozen base counts as parameters too (it has no optimizer state and no gradient).
    params = per_device_bytes((setup.abstract_state.params, setup.abstract_state.frozen),
                              (setup.state_shardings.params, setup.state_shardings.frozen))
    opt_state = per_device_bytes(setup.abstract_state.opt_state, setup.state_shardings.opt_state)
    temp = int(analysis.temp_size_in_bytes)
    total = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes + temp)
    return {"params": params, "opt_state": opt_state, "temp": temp, "total": total}
