"""One conversion to plain Python for JSON files and ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_plain"]


def to_plain(obj: Any, *, finite: bool = True) -> Any:
    """Plain Python (dict, list, str, int, float, bool, None) version of ``obj``.

    numpy scalars and arrays become numbers and (nested) lists, pandas objects lists or
    dicts of lists, paths strings, dates ISO strings, dataclasses and objects with
    ``to_dict()`` their dict; anything else its ``str``. With ``finite`` (strict JSON)
    ``nan`` and ``inf`` become ``None``.

    Examples
    --------
    >>> to_plain({"acc": np.float32(0.5), "x": np.arange(2), "bad": float("nan")})
    {'acc': 0.5, 'x': [0, 1], 'bad': None}
    """
    if obj is None or isinstance(obj, bool | str | int):
        return obj
    if isinstance(obj, float):
        return None if finite and not math.isfinite(obj) else obj
    if isinstance(obj, np.generic):
        return to_plain(obj.item(), finite=finite)
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist(), finite=finite)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, finite=finite) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_plain(v, finite=finite) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    import pandas as pd

    if isinstance(obj, pd.DataFrame):
        return to_plain(obj.to_dict(orient="list"), finite=finite)
    if isinstance(obj, pd.Series | pd.Index | pd.Categorical):
        return to_plain(list(obj), finite=finite)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_plain(dataclasses.asdict(obj), finite=finite)
    if hasattr(obj, "to_dict"):
        return to_plain(obj.to_dict(), finite=finite)
    return str(obj)
