"""From MindSpore parameter names to the torch trunk: variant detection and key mapping.

Variants (recognised by parameter names, never by file name):

* ``"A"``: the public MindSpore CellFM class (``zero_emb``, decoders; ``zero_logit`` heads
  when trained with ``add_zero``).
* ``"A'"``: the annotation ``Backbone`` (no ``zero_emb``, no decoders).
* ``"B"``: the public PyTorch port's checkpoints (``ST_emb``, ``ST_enc.*``).

This module works on names, shapes and states: :func:`read_trunk_checkpoint` returns the
config and the checked state of a file, :func:`load_trunk_state` fills a trunk and returns
the :class:`LoadReport`, and :func:`build_trunk` does both for a trunk class it is given. It
does not import :mod:`cellfm_sc.nn.trunk` (whose ``CellFMTrunk.from_mindspore`` calls
:func:`build_trunk`); :mod:`cellfm_sc.io.trunk` builds and exports the
:class:`~cellfm_sc.nn.CellFMTrunk` itself.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cellfm_sc.io._values import DEFAULT_MAX_ABS, check_values
from cellfm_sc.io.checkpoint import read_mindspore_checkpoint
from cellfm_sc.nn.config import CellFMConfig

__all__ = [
    "NUM_HEADS_ENTRY",
    "LoadReport",
    "TrunkCheckpoint",
    "build_trunk",
    "check_state_values",
    "detect_variant",
    "infer_config",
    "is_bookkeeping",
    "load_trunk_state",
    "read_trunk_checkpoint",
    "split_state",
    "stored_num_heads",
    "to_mindspore_name",
    "to_torch_names",
]

# optimizer state and training bookkeeping that MindSpore writes beside the weights
_BOOKKEEPING_NAMES = frozenset(
    {
        "global_step",
        "learning_rate",
        "beta1_power",
        "beta2_power",
        "scale_sense",
        "epoch_num",
        "step_num",
        "current_iterator_step",
        "last_overflow_iterator_step",
        "loss_scale",
        "accum_step",
        "num_heads",
    }
)
#: bookkeeping entry (an integer scalar) in which cellfm-sc's exports record the number of
#: retention heads, which the shapes cannot tell; MindSpore's loaders leave it unloaded
NUM_HEADS_ENTRY = "num_heads"
_BOOKKEEPING_PREFIXES = ("moment1.", "moment2.", "moments.", "accum.", "adam_m.", "adam_v.")
# top-level names of a trunk parameter (after any wrapper prefix is stripped)
_TOP_LEVEL = frozenset(
    {
        "gene_emb",
        "cls_token",
        "zero_emb",
        "value_enc",
        "encoder",
        "value_dec",
        "cellwise_dec",
        "ST_emb",
        "ST_enc",
    }
)
_LN_RENAME = re.compile(r"(post_norm\d)\.(gamma|beta)$")
_LN_RENAME_BACK = re.compile(r"(post_norm\d)\.(weight|bias)$")


def is_bookkeeping(name: str) -> bool:
    """Whether a checkpoint entry is optimizer state or bookkeeping (skipped on load)."""
    return name in _BOOKKEEPING_NAMES or name.startswith(_BOOKKEEPING_PREFIXES)


def _strip_wrapper(names: list[str]) -> str:
    """The wrapper prefix every model key carries (``"network."``), or ``""``."""
    prefix = ""
    rest = names
    while rest and all("." in n for n in rest):
        heads = {n.split(".", 1)[0] for n in rest}
        if len(heads) != 1 or next(iter(heads)) in _TOP_LEVEL:
            break
        head = next(iter(heads))
        prefix += head + "."
        rest = [n.split(".", 1)[1] for n in rest]
    return prefix


def to_torch_names(name: str) -> str:
    """MindSpore -> torch parameter name (LayerNorm ``gamma/beta`` -> ``weight/bias``)."""
    return _LN_RENAME.sub(
        lambda m: f"{m.group(1)}.{'weight' if m.group(2) == 'gamma' else 'bias'}", name
    )


def to_mindspore_name(name: str) -> str:
    """torch -> MindSpore parameter name; the exact inverse of :func:`to_torch_names`.

    Examples
    --------
    >>> to_mindspore_name("encoder.1.post_norm2.bias")
    'encoder.1.post_norm2.beta'
    >>> to_torch_names(to_mindspore_name("encoder.0.post_norm1.weight"))
    'encoder.0.post_norm1.weight'
    """
    return _LN_RENAME_BACK.sub(
        lambda m: f"{m.group(1)}.{'gamma' if m.group(2) == 'weight' else 'beta'}", name
    )


def split_state(
    state: Mapping[str, Any],
) -> tuple[dict[str, Any], list[str], str]:
    """Separate model tensors from bookkeeping entries and strip a wrapper prefix.

    Returns
    -------
    model
        torch-named model tensors, in file order.
    skipped
        names of the skipped bookkeeping entries.
    prefix
        the wrapper prefix that was stripped (``""`` if none).

    Examples
    --------
    >>> import numpy as np
    >>> state = {"network.encoder.0.post_norm1.gamma": np.ones(4), "global_step": np.zeros(1)}
    >>> model, skipped, prefix = split_state(state)
    >>> list(model), skipped, prefix
    (['encoder.0.post_norm1.weight'], ['global_step'], 'network.')
    """
    skipped = [k for k in state if is_bookkeeping(k)]
    model_keys = [k for k in state if not is_bookkeeping(k)]
    prefix = _strip_wrapper(model_keys)
    model = {to_torch_names(k[len(prefix) :]): state[k] for k in model_keys}
    return model, skipped, prefix


def detect_variant(names: Mapping[str, Any] | list[str]) -> str:
    """``"B"`` (ST tokens), ``"A"`` (CellFM class) or ``"A'"`` (annotation Backbone).

    Examples
    --------
    >>> detect_variant(["gene_emb", "cls_token", "zero_emb", "encoder.0.attn.q_proj.weight"])
    'A'
    >>> detect_variant(["gene_emb", "cls_token", "ST_emb"])
    'B'
    """
    keys = set(names)
    if "ST_emb" in keys:
        return "B"
    if "zero_emb" in keys or any(k.startswith(("value_dec.", "cellwise_dec.")) for k in keys):
        return "A"
    return "A'"


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def stored_num_heads(state: Mapping[str, Any]) -> int | None:
    """The retention heads recorded in a checkpoint's ``num_heads`` entry, or ``None``.

    cellfm-sc writes that entry when it exports a trunk
    (``save_trunk_mindspore(..., record_num_heads=True)``); other checkpoints lack it.

    Raises
    ------
    ValueError
        If the entry is not one positive integer.
    """
    if NUM_HEADS_ENTRY not in state:
        return None
    arr = np.asarray(state[NUM_HEADS_ENTRY])
    if arr.size != 1 or arr.dtype.kind not in "iu" or int(arr.reshape(-1)[0]) < 1:
        raise ValueError(
            f"the checkpoint's {NUM_HEADS_ENTRY!r} entry should be one positive integer, got "
            f"{arr.dtype} of shape {arr.shape}"
        )
    return int(arr.reshape(-1)[0])


def infer_config(
    model: Mapping[str, Any],
    num_heads: int | None = None,
    *,
    stored_heads: int | None = None,
    **overrides: Any,
) -> tuple[CellFMConfig, int]:
    """Config and gene-embedding rows from torch-named model tensors.

    ``num_heads`` cannot be read from shapes: it defaults to the heads the checkpoint
    records (``stored_heads``, see ``stored_num_heads``), else to 48 when ``enc_dims`` is
    1536 (both released models), and is required otherwise. A ``num_heads`` that contradicts
    ``stored_heads`` is an error.
    """
    if num_heads is not None and stored_heads is not None and int(num_heads) != stored_heads:
        raise ValueError(
            f"num_heads={num_heads} contradicts the checkpoint, which records {stored_heads} "
            "retention heads; leave num_heads unset"
        )
    if num_heads is None:
        num_heads = stored_heads
    for required in ("gene_emb", "cls_token"):
        if required not in model:
            raise ValueError(
                f"checkpoint has no {required!r} parameter; is it a CellFM checkpoint? "
                f"(first names: {list(model)[:5]})"
            )
    rows, dims = _shape(model["gene_emb"])
    layers = {int(m.group(1)) for k in model if (m := re.match(r"encoder\.(\d+)\.", k))}
    if not layers:
        raise ValueError("checkpoint has no 'encoder.{i}.*' retention layers")
    n_layers = max(layers) + 1
    if num_heads is None:
        if dims != 1536:
            raise ValueError(
                f"num_heads cannot be read from a checkpoint; enc_dims={dims} is not a "
                "released size (1536), so pass num_heads="
            )
        num_heads = 48
    bins = (
        _shape(model["value_enc.value_enc.w1.weight"])[0]
        if "value_enc.value_enc.w1.weight" in model
        else 256
    )
    variant = detect_variant(model)
    cfg = CellFMConfig(
        enc_dims=dims,
        num_heads=num_heads,
        n_layers=n_layers,
        value_bins=bins,
        zero_emb="zero_emb" in model,
        decoders=any(k.startswith("value_dec.") for k in model),
        zero_logit=any(".zero_logit." in k for k in model),
        st_tokens=variant == "B",
    )
    if overrides:
        cfg = replace(cfg, **overrides)
    return cfg, rows


@dataclass
class LoadReport:
    """What a MindSpore checkpoint load did.

    Attributes
    ----------
    variant
        ``"A"``, ``"A'"`` or ``"B"`` (see module docstring).
    loaded
        torch names of the parameters taken from the checkpoint.
    skipped
        checkpoint entries skipped as optimizer state or bookkeeping.
    excluded
        parameters deliberately not taken from the checkpoint (e.g. ``gene_emb`` when a
        new vocabulary gets its own table), with the checkpoint shape.
    prefix
        wrapper prefix stripped from every key.
    source
        file the state came from, if any.
    """

    variant: str
    loaded: list[str]
    skipped: list[str]
    excluded: dict[str, tuple[int, ...]] = field(default_factory=dict)
    prefix: str = ""
    source: str | None = None
    config: CellFMConfig | None = None

    @property
    def variant_description(self) -> str:
        """The variant in words (e.g. ``"public MindSpore CellFM"``)."""
        return {
            "A": "public MindSpore CellFM",
            "A'": "CellFM annotation Backbone (no zero_emb, no decoders)",
            "B": "CellFM with ST tokens (public PyTorch port)",
        }[self.variant]

    def __str__(self) -> str:
        lines = [f"CellFM checkpoint load: variant {self.variant} ({self.variant_description})"]
        if self.source:
            lines.append(f"  source: {self.source}")
        if self.config is not None:
            c = self.config
            lines.append(
                f"  config: enc_dims={c.enc_dims} num_heads={c.num_heads} n_layers={c.n_layers}"
            )
        if self.prefix:
            lines.append(f"  stripped wrapper prefix {self.prefix!r}")
        lines.append(f"  loaded {len(self.loaded)} parameters")
        for name, shape in self.excluded.items():
            lines.append(f"  not loaded by design: {name} {shape}")
        if self.skipped:
            shown = ", ".join(self.skipped[:6]) + (" ..." if len(self.skipped) > 6 else "")
            lines.append(f"  skipped {len(self.skipped)} optimizer/bookkeeping entries: {shown}")
        return "\n".join(lines)


def check_state_values(
    state: Mapping[str, Any],
    *,
    max_abs: float | None = DEFAULT_MAX_ABS,
    source: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse a checkpoint whose model tensors hold NaN/inf or ``|value| > max_abs``.

    Every entry except optimizer state / bookkeeping (``is_bookkeeping``, not checked)
    is checked, including ``gene_emb`` when a new vocabulary will not load it: a corrupt
    table means a corrupt file. Cost: a ``min`` and a ``max`` per tensor, no copies.

    Parameters
    ----------
    state
        Checkpoint name -> array/tensor, as read by
        :func:`~cellfm_sc.io.read_mindspore_checkpoint`.
    max_abs
        Bound on ``|value|`` (default ``1e6``); ``None`` skips the magnitude check.
        Non-finite values are always refused.
    source
        The file, for the message.

    Raises
    ------
    CheckpointError
        Naming the tensor (its checkpoint name), the offending value and its index.
    """
    for name, value in state.items():
        if not is_bookkeeping(name):
            check_values(name, value, max_abs=max_abs, path=source)


def load_trunk_state(
    trunk: torch.nn.Module,
    state: Mapping[str, Any],
    *,
    exclude: tuple[str, ...] = (),
    source: str | None = None,
    max_abs: float | None = DEFAULT_MAX_ABS,
    check: bool = True,
) -> LoadReport:
    """Copy a MindSpore-named state into ``trunk``, strictly.

    Every trunk parameter not in ``exclude`` must be present with the same shape; a
    checkpoint entry the trunk has no place for is an error too (unless it is optimizer
    state or bookkeeping, which is skipped and listed).

    Parameters
    ----------
    trunk
        The :class:`~cellfm_sc.nn.CellFMTrunk` to fill (its parameters are overwritten in
        place).
    state
        Checkpoint name -> array/tensor (MindSpore names: ``post_norm1.gamma`` ...).
    exclude
        torch names of parameters not to take from the checkpoint (e.g. ``("gene_emb",)``).
    source
        The file the state came from, for the report and messages.
    max_abs
        See :func:`check_state_values`.
    check
        Run :func:`check_state_values` first; ``False`` only when the caller already did.

    Raises
    ------
    ValueError
        naming the missing/unexpected parameters, or the parameter and both shapes.
    CheckpointError
        (a ``ValueError``) for NaN/inf or ``|value| > max_abs`` in a model tensor.
    """
    if check:
        check_state_values(state, max_abs=max_abs, source=source)
    model, skipped, prefix = split_state(state)
    own = dict(trunk.named_parameters())
    missing = [k for k in own if k not in model and k not in exclude]
    unexpected = [k for k in model if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {missing}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the trunk: {unexpected}")
        raise ValueError(
            f"checkpoint does not fit the trunk (variant {detect_variant(model)}): "
            + "; ".join(parts)
        )
    for name, param in own.items():
        if name in exclude:
            continue
        src = _shape(model[name])
        if src != tuple(param.shape):
            raise ValueError(
                f"shape mismatch for parameter {name!r}: checkpoint {src} vs model "
                f"{tuple(param.shape)}"
            )
    loaded = []
    with torch.no_grad():
        for name, param in own.items():
            if name in exclude:
                continue
            value = model[name]
            tensor = (
                value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            )
            param.copy_(tensor.to(param.dtype))
            loaded.append(name)
    excluded = {k: _shape(model[k]) for k in exclude if k in model}
    return LoadReport(
        variant=detect_variant(model),
        loaded=loaded,
        skipped=skipped,
        excluded=excluded,
        prefix=prefix,
        source=source,
        config=trunk.config,
    )


@dataclass(frozen=True)
class TrunkCheckpoint:
    """A MindSpore checkpoint read and checked, with the trunk it describes.

    Attributes
    ----------
    config
        The trunk's config (inferred from parameter names and shapes, overrides applied).
    emb_rows
        Rows of the checkpoint's ``gene_emb`` table.
    state
        Every entry of the file under its MindSpore name (bookkeeping included), as
        :func:`load_trunk_state` takes it.
    model
        The model tensors under their torch names (:func:`split_state`).
    source
        The file it was read from.
    """

    config: CellFMConfig
    emb_rows: int
    state: dict[str, Any]
    model: dict[str, Any]
    source: str


def read_trunk_checkpoint(
    path: str | os.PathLike[str],
    num_heads: int | None = None,
    max_abs: float | None = DEFAULT_MAX_ABS,
    **overrides: Any,
) -> TrunkCheckpoint:
    """Read a ``.ckpt``, check its values and infer the config of the trunk it holds.

    Parameters are those of :func:`cellfm_sc.io.trunk_from_mindspore`.
    """
    state = read_mindspore_checkpoint(path)
    check_state_values(state, max_abs=max_abs, source=path)
    model, _, _ = split_state(state)
    cfg, rows = infer_config(
        model, num_heads=num_heads, stored_heads=stored_num_heads(state), **overrides
    )
    return TrunkCheckpoint(config=cfg, emb_rows=rows, state=state, model=model, source=str(path))


def build_trunk(
    trunk_class: type[torch.nn.Module],
    path: str | os.PathLike[str],
    num_heads: int | None = None,
    max_abs: float | None = DEFAULT_MAX_ABS,
    **overrides: Any,
) -> tuple[Any, LoadReport]:
    """Read a ``.ckpt`` and build the matching trunk with every parameter loaded.

    The one place a trunk is built from a MindSpore checkpoint:
    :func:`cellfm_sc.io.trunk_from_mindspore` and
    :meth:`CellFMTrunk.from_mindspore <cellfm_sc.nn.CellFMTrunk.from_mindspore>` call it
    with their class, so this module needs no import of the trunk.

    Parameters
    ----------
    trunk_class
        :class:`~cellfm_sc.nn.CellFMTrunk` (or a subclass), called as
        ``trunk_class(config, n_genes=emb_rows - 1, emb_rows=emb_rows)``.
    path, num_heads, max_abs, overrides
        As for :func:`cellfm_sc.io.trunk_from_mindspore`, which also gives what this returns
        and raises (the trunk is a ``trunk_class``).
    """
    ckpt = read_trunk_checkpoint(path, num_heads=num_heads, max_abs=max_abs, **overrides)
    trunk = trunk_class(ckpt.config, n_genes=ckpt.emb_rows - 1, emb_rows=ckpt.emb_rows)
    report = load_trunk_state(trunk, ckpt.state, source=ckpt.source, check=False)
    trunk.load_report = report
    if ckpt.config.st_tokens:
        warnings.warn(
            "variant B checkpoint: the two ST tokens are the constant ST_emb rows (inference "
            "form), also during training; ST_enc is loaded but not used",
            stacklevel=3,  # the caller of trunk_from_mindspore / CellFMTrunk.from_mindspore
        )
    return trunk, report
