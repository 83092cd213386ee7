"""One JSON Lines record read from its bytes, with the one wording of what can be wrong with it.

The `jsonl` source (sources.py) and `prepare --format jsonl|chat` (prepare.py) both read
lines of user files; each names the file and line itself and adds this message after it.
"""
from __future__ import annotations

import json
from typing import Any

from efficient_train.data.errors import DataError


def parse_line(line: bytes) -> Any:
    """The JSON value of one line; a DataError saying what is wrong (UTF-8, syntax, depth, size) otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1}); "
                        "JSON Lines files are UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read; a line is one flat object") from None
    except ValueError as error:  # an integer of more digits than Python converts
        raise DataError(" ".join(str(error).split())[:120]) from None


def field_of(record: Any, field: str) -> Any:
    """`record[field]` of a record that must be an object holding `field`."""
    if not isinstance(record, dict):
        raise DataError(f"a JSON {type(record).__name__}, not an object with field '{field}'")
    if field not in record:
        raise DataError(f"field '{field}' missing; each line must be an object with it")
    return record[field]
