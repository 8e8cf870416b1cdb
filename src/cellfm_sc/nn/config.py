"""Model configuration and named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cellfm_sc._constants import PRESET_NAMES

__all__ = ["PRESETS", "CellFMConfig", "padded_rows"]


def padded_rows(n_genes: int, multiple: int = 8) -> int:
    """Rows of a gene-embedding table for ``n_genes`` genes plus the padding row.

    ``n_genes + 1`` rounded up to a multiple of ``multiple`` (27,855 -> 27,856;
    36,601 -> 36,608; 37 -> 40).

    Examples
    --------
    >>> padded_rows(36601)
    36608
    """
    if n_genes < 0:
        raise ValueError(f"n_genes must be >= 0, got {n_genes}")
    return -(-(n_genes + 1) // multiple) * multiple


@dataclass(frozen=True)
class CellFMConfig:
    """Hyper-parameters of the CellFM trunk.

    Parameters
    ----------
    enc_dims
        Model width ``D`` (1536 in the released models).
    num_heads
        Retention heads; ``D`` must be divisible by it (head dim ``D / num_heads``).
    n_layers
        Number of retention layers (80M: 2, 800M: 40).
    dropout
        Encoder dropout; layer ``i`` uses ``dropout * i / n_layers`` as the original does.
    value_bins
        Width of the soft-binning value encoder (256).
    ln_eps
        LayerNorm epsilon; MindSpore's default ``1e-7`` (not torch's ``1e-5``).
    leaky_slope
        Negative slope of every LeakyReLU; MindSpore's default ``0.2``.
    zero_emb
        Whether the trunk holds the ``zero_emb`` token (CellFM class; absent in the
        annotation Backbone).
    decoders
        Whether the value and cellwise decoders exist (CellFM class).
    zero_logit
        Whether the decoders carry the ``zero_logit`` heads (``add_zero=True``).
    st_tokens
        Variant B: two ``ST_emb`` tokens follow cls, and an ``ST_enc`` encoder exists.
    """

    enc_dims: int = 1536
    num_heads: int = 48
    n_layers: int = 2
    dropout: float = 0.1
    value_bins: int = 256
    ln_eps: float = 1e-7
    leaky_slope: float = 0.2
    zero_emb: bool = True
    decoders: bool = True
    zero_logit: bool = False
    st_tokens: bool = False

    def __post_init__(self) -> None:
        if self.enc_dims <= 0 or self.num_heads <= 0 or self.n_layers <= 0:
            raise ValueError(
                "enc_dims, num_heads and n_layers must be positive, got "
                f"{self.enc_dims}, {self.num_heads}, {self.n_layers}"
            )
        if self.enc_dims % self.num_heads:
            raise ValueError(
                f"enc_dims={self.enc_dims} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        """Per-head width ``D / num_heads``."""
        return self.enc_dims // self.num_heads

    @property
    def n_prefix(self) -> int:
        """Number of tokens before the genes (cls, plus the two ST tokens of variant B)."""
        return 3 if self.st_tokens else 1

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CellFMConfig:
        """A named preset, optionally with fields overridden.

        Examples
        --------
        >>> CellFMConfig.from_preset("80M").enc_dims
        1536
        >>> CellFMConfig.from_preset("tiny").n_layers
        2
        """
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what saved models store in ``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellFMConfig:
        """The configuration of :meth:`to_dict`'s dict (unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, CellFMConfig] = {
    # small random trunks for CPUs, tests and the demo
    "tiny": CellFMConfig(enc_dims=64, num_heads=4, n_layers=2),
    "small": CellFMConfig(enc_dims=256, num_heads=8, n_layers=2),
    "80M": CellFMConfig(enc_dims=1536, num_heads=48, n_layers=2),
    "800M": CellFMConfig(enc_dims=1536, num_heads=48, n_layers=40),
}
if tuple(PRESETS) != PRESET_NAMES:  # pragma: no cover - a programming error
    raise RuntimeError(f"PRESETS {tuple(PRESETS)} disagree with PRESET_NAMES {PRESET_NAMES}")
