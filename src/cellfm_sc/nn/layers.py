"""Building blocks of the CellFM trunk, one block per class."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GatedLinearUnit",
    "MultiHeadRetention",
    "RetentionLayer",
    "SoftBinEncoder",
    "ValueEncoder",
    "srms_norm",
]


def srms_norm(x: Tensor) -> Tensor:
    """Scale-only RMS normalisation over the last dim, computed in float32.

    ``y = x / max(||x / sqrt(d)||_2, 1e-12)``; no learned weight, no epsilon inside the
    square root (as the original). Returns float32.

    Parameters
    ----------
    x
        ``(..., d)``.
    """
    x32 = x.float()
    d = x32.shape[-1]
    rms = torch.linalg.vector_norm(x32 / math.sqrt(d), dim=-1, keepdim=True)
    return x32 / rms.clamp_min(1e-12)


class SoftBinEncoder(nn.Module):
    """Soft-binning FFN that maps a scalar to a ``D``-vector.

    ``h = LeakyReLU(w1 x)`` (1 -> bins, slope 0.2), ``h = w3 h + a * h``, ``h = softmax(h)``,
    ``out = table h`` (bins -> D). All bias-free. Parameter names follow the checkpoint.

    Shapes: ``(...,)`` -> ``(..., D)``.
    """

    def __init__(self, dim: int, bins: int = 256, leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.w1 = nn.Linear(1, bins, bias=False)
        self.w3 = nn.Linear(bins, bins, bias=False)
        self.table = nn.Linear(bins, dim, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor) -> Tensor:
        # The input is a scalar, so LeakyReLU(w1 x) is linear in x on each side of 0:
        # x * LeakyReLU(w1) for x >= 0 and x * -LeakyReLU(-w1) for x < 0. The bins' logits
        # are then x * c with c = (W3 + a I) g for the matching g: exact, with no
        # (bins x bins) product per token (normalised counts are never negative, so the
        # second term is zero in practice).
        w = self.w1.weight[:, 0]
        g = torch.stack([F.leaky_relu(w, self.leaky_slope), -F.leaky_relu(-w, self.leaky_slope)])
        c = (self.w3(g) + self.a[0, 0] * g).to(x.dtype)  # (2, bins)
        x = x.unsqueeze(-1)
        logits = x.clamp(min=0) * c[0] + x.clamp(max=0) * c[1]
        return self.table(torch.softmax(logits, dim=-1))


class ValueEncoder(nn.Module):
    """Value encoder: the soft-binning FFN plus the mask embedding of pretraining.

    Parameter names: ``value_enc.value_enc.{w1,w3,table}.weight``, ``value_enc.value_enc.a``,
    ``value_enc.mask_emb``.

    Shapes: values ``(B, L)`` -> ``(B, L, D)``. With ``unmask`` ``(B, L)`` (pretraining
    input), masked positions take ``mask_emb`` instead.
    """

    def __init__(self, dim: int, bins: int = 256, leaky_slope: float = 0.2) -> None:
        super().__init__()
        self.value_enc = SoftBinEncoder(dim, bins, leaky_slope)
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, values: Tensor, unmask: Tensor | None = None) -> Tensor:
        emb = self.value_enc(values)
        if unmask is not None:
            m = unmask.unsqueeze(-1).to(emb.dtype)
            emb = emb * m + self.mask_emb * (1 - m)
        return emb


class MultiHeadRetention(nn.Module):
    """Linear retention (no softmax, no decay), ``O(L * hd^2)`` per head.

    ``Q = relu(q x) / sqrt(hd)``, ``K = relu(k x) / sqrt(hd)`` zeroed at invalid keys,
    ``V = (v x) * len_scale``, ``U = silu(u x)``; ``O = srms(Q (K^T V)) * U`` per head;
    heads merged; ``o_proj``.

    Shapes: ``x (B, S, D)``, ``key_mask (B, S)`` bool, ``len_scale (B,)`` -> ``(B, S, D)``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.u_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def _heads(self, t: Tensor) -> Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)

    def forward(self, x: Tensor, key_mask: Tensor, len_scale: Tensor) -> Tensor:
        b, s, d = x.shape
        scale = 1.0 / math.sqrt(self.head_dim)
        q = self._heads(F.relu(self.q_proj(x))) * scale
        k = F.relu(self.k_proj(x)) * key_mask.unsqueeze(-1).to(x.dtype)
        k = self._heads(k) * scale
        v = self._heads(self.v_proj(x) * len_scale.view(b, 1, 1).to(x.dtype))
        u = F.silu(self.u_proj(x))
        kv = k.transpose(-1, -2) @ v  # (B, H, hd, hd)
        o = srms_norm(q @ kv)  # (B, H, S, hd), float32
        o = o.transpose(1, 2).reshape(b, s, d)
        return self.o_proj((o * u.float()).to(x.dtype))


class GatedLinearUnit(nn.Module):
    """``o_proj(u_proj(x) * v_proj(x))``, bias-free, no activation. ``(B, S, D) -> (B, S, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.u_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class RetentionLayer(nn.Module):
    """Post-norm retention layer.

    ``x = LN1(alpha x + drop(retention(x)))``; ``x = LN2(alpha x + drop(glu(x)))`` with
    ``alpha = (2 n_layers) ** 0.25`` and LayerNorm epsilon 1e-7.

    Shapes: ``x (B, S, D)``, ``key_mask (B, S)``, ``len_scale (B,)`` -> ``(B, S, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_layers: int,
        dropout: float = 0.0,
        ln_eps: float = 1e-7,
    ) -> None:
        super().__init__()
        self.attn = MultiHeadRetention(dim, num_heads)
        self.ffn = GatedLinearUnit(dim)
        self.post_norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.post_norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.alpha = (2.0 * n_layers) ** 0.25

    def forward(self, x: Tensor, key_mask: Tensor, len_scale: Tensor) -> Tensor:
        x = self.post_norm1(self.alpha * x + self.dropout1(self.attn(x, key_mask, len_scale)))
        return self.post_norm2(self.alpha * x + self.dropout2(self.ffn(x)))
