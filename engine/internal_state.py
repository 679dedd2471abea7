"""set_internal_state: the knobs that are safe to change between scheduler steps.

Anything else (page size, pool size, model, device) is fixed at start: changing it live would
invalidate the KV pool or the request table. A change is checked whole before any key applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from schedscope.engine.control_errors import StateKeyError

_MAX_INT = 2**31 - 1

# key -> (type, check, what is allowed)
SAFE_KNOBS: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "max_running_requests": (int, lambda v: 1 <= v <= _MAX_INT, "an integer >= 1"),
    "max_prefill_tokens": (int, lambda v: 1 <= v <= _MAX_INT, "an integer in [1, 2**31)"),
    "chunked_prefill_size": (
        int,
        lambda v: 1 <= v <= _MAX_INT,
        "an integer in [1, 2**31) (or null: no chunking)",
    ),
    "decode_log_interval": (int, lambda v: 1 <= v <= _MAX_INT, "an integer in [1, 2**31)"),
    # An hour at most: a huge interval overflows the nanosecond deadline arithmetic.
    "kv_load_interval_s": (float, lambda v: 0 < v <= 3600, "a number in (0, 3600]"),
    "min_new_token_ratio": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "new_token_ratio_decay": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}


def parse_knobs(changes: Mapping[str, Any], *, max_running_rows: int) -> dict[str, Any]:
    """The typed values of ``changes``; StateKeyError naming the first bad key."""
    parsed: dict[str, Any] = {}
    for key, value in changes.items():
        spec = SAFE_KNOBS.get(key)
        if spec is None:
            raise StateKeyError(
                f"{key!r} cannot be set at run time; settable: {', '.join(sorted(SAFE_KNOBS))}"
            )
        typ, ok, allowed = spec
        if key == "chunked_prefill_size" and value is None:
            parsed[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StateKeyError(f"{key} must be {allowed}, got {value!r}")
        try:
            finite = math.isfinite(float(value))
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise StateKeyError(f"{key} must be {allowed} (finite), got {value!r}")
        if typ is int and not float(value).is_integer():
            raise StateKeyError(f"{key} must be {allowed}, got {value!r}")
        value = typ(value)
        if not ok(value):
            raise StateKeyError(f"{key} must be {allowed}, got {value!r}")
        parsed[key] = value
    if parsed.get("max_running_requests", 0) > max_running_rows:
        raise StateKeyError(
            f"max_running_requests must be <= {max_running_rows} "
            "(request table rows allocated at start)"
        )
    return parsed
