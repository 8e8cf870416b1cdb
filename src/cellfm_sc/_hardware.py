"""Is the accelerator asked for on this machine? Checked before any model is built.

Lightning finds out only when its ``Trainer`` is built (after the data are read and the
model is made), and says it in its own words (``MisconfigurationException: No supported gpu
backend found!``). These checks say it first, in one line with the fix, as a ``ValueError``
(exit status 2 on the command line, where ``accelerator=`` reads ``--accelerator``).
Imports torch only inside the functions, and not at all where the installed torch is a
CPU-only build (the command line's front stays light).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["check_accelerator", "check_device"]

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


@functools.cache
def _cpu_only_build() -> bool:
    """Whether the installed torch was built without CUDA and ROCm, read from its
    ``version.py`` without importing torch (seconds saved on a CPU machine)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return False
    found = dict(re.findall(r"^(cuda|hip)\s*(?::[^=]*)?=\s*(\S+)", text, flags=re.M))
    return found.get("cuda") == "None" and found.get("hip") == "None"


def _cuda_count() -> int:
    if _cpu_only_build():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps() -> bool:
    if sys.platform != "darwin":  # Apple's Metal backend exists on macOS only
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _no_cuda_reason() -> str:
    if _cpu_only_build():
        return "this PyTorch build has no CUDA support (a CPU-only build)"
    return "no CUDA GPU is visible (torch.cuda.is_available() is False)"


def _requested(devices: Any) -> tuple[int | None, list[int] | None]:
    """``(count, indices)`` of a Lightning ``devices`` value (None: 'auto' or -1)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None, None
        parts = [p for p in text.split(",") if p.strip()]
        if "," in text:
            return None, [int(p) for p in parts]
        return int(text), None
    if isinstance(devices, int) and not isinstance(devices, bool):
        return (None, None) if devices == -1 else (devices, None)
    if isinstance(devices, Sequence):
        return None, [int(d) for d in devices]
    return None, None


def _check_count(accelerator: str, devices: Any, available: int, kind: str) -> None:
    count, indices = _requested(devices)
    have = f"this machine has {available} {kind}{'s' if available != 1 else ''}"
    if count is not None and count > available:
        raise ValueError(
            f"devices={devices!r} with accelerator={accelerator!r} but {have}; pass "
            f"devices={available} or devices='auto'"
        )
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < available]
        if bad:
            raise ValueError(
                f"devices={devices!r} names {kind} {bad} but {have} (indices 0..{available - 1}); "
                "pass devices='auto' or indices that exist"
            )


def check_accelerator(accelerator: Any = "auto", devices: Any = "auto") -> None:
    """Refuse an accelerator, or a number of devices, that this machine does not have.

    Parameters
    ----------
    accelerator
        Lightning's ``accelerator``: ``"auto"``, ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"mps"``
        or ``"tpu"`` (a Lightning ``Accelerator`` object is not checked).
    devices
        Lightning's ``devices``: ``"auto"``, a count, or device indices.

    Raises
    ------
    ValueError
        One line naming what was asked, what the machine has, and the fix (e.g. "use
        accelerator='auto' or accelerator='cpu'").

    Examples
    --------
    >>> check_accelerator("cpu")
    >>> check_accelerator("quantum")
    Traceback (most recent call last):
    ...
    ValueError: accelerator='quantum' is not one of ('auto', 'cpu', 'gpu', 'cuda', 'mps', 'tpu')
    """
    if not isinstance(accelerator, str):
        return
    accel = accelerator.lower()
    if accel not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not one of {ACCELERATORS}")
    fix = "use accelerator='auto' (a GPU when there is one, else the CPU) or accelerator='cpu'"
    if accel in ("gpu", "cuda"):
        n = _cuda_count()
        if n == 0 and accel == "gpu" and _mps():
            _check_count(accelerator, devices, 1, "MPS device")
            return
        if n == 0:
            raise ValueError(f"accelerator={accelerator!r} but {_no_cuda_reason()}; {fix}")
        _check_count(accelerator, devices, n, "CUDA GPU")
    elif accel == "mps":
        if not _mps():
            raise ValueError(
                f"accelerator={accelerator!r} but Apple's MPS backend is not available; {fix}"
            )
        _check_count(accelerator, devices, 1, "MPS device")
    elif accel == "tpu":
        if importlib.util.find_spec("torch_xla") is None:
            raise ValueError(f"accelerator={accelerator!r} but torch_xla is not installed; {fix}")
    elif accel == "auto":
        n = _cuda_count()
        if n:  # Lightning's auto picks the GPUs
            _check_count(accelerator, devices, n, "CUDA GPU")


def check_device(device: Any) -> None:
    """Refuse an inference ``device`` (``"cuda"``, ``"cuda:1"``, ``"mps"``) that is not here.

    ``None`` and ``"cpu"`` always pass.

    Raises
    ------
    ValueError
        One line with what the machine has and the fix (``device=None`` picks a GPU when
        there is one).
    """
    if device is None:
        return
    text = str(device)
    kind, _, index = text.partition(":")
    fix = "use device=None (a GPU when there is one, else the CPU) or device='cpu'"
    if kind == "cuda":
        n = _cuda_count()
        if n == 0:
            raise ValueError(f"device={text!r} but {_no_cuda_reason()}; {fix}")
        if index and int(index) >= n:
            raise ValueError(
                f"device={text!r} but this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                f"(cuda:0..cuda:{n - 1}); {fix}"
            )
    elif kind == "mps" and not _mps():
        raise ValueError(f"device={text!r} but Apple's MPS backend is not available; {fix}")
