"""JSON files that stay JSON.

Python's ``json`` writes a NaN or infinite float as the bare ``NaN`` / ``Infinity``, which is not JSON: other
readers (``jq``, browsers, pandas' strict mode) refuse the file. :func:`dumps` writes such a value as ``null`` and
names its place under the key ``nonfinite`` of the enclosing record (of each record of a top-level list), so a
reader can tell a missing value from one that was not a number.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: the key that lists the places (``cost.flops``, ``samples[2].reward``) where a non-finite float became null
NONFINITE_KEY = "nonfinite"


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, allow_nan=False, **kwargs)`` after replacing non-finite floats by ``None`` (flagged)."""
    clean = [_flagged(item) for item in value] if isinstance(value, (list, tuple)) else _flagged(value)
    return json.dumps(clean, allow_nan=False, **kwargs)


def _flagged(value: Any) -> Any:
    found: list[str] = []
    clean = _finite(value, "", found)
    if found and isinstance(clean, dict):
        clean[NONFINITE_KEY] = found
    return clean


def _finite(value: Any, path: str, found: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path or "(value)")
        return None
    if isinstance(value, dict):
        return {key: _finite(item, f"{path}.{key}" if path else str(key), found) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item, f"{path}[{index}]", found) for index, item in enumerate(value)]
    return value
