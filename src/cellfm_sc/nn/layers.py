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


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 when it is float64 (half precision is widened)."""
    return x if x.dtype == torch.float64 else x.float()


def srms_norm(x: Tensor) -> Tensor:
    """Scale-only RMS normalisation over the last dim, computed in float32.

    ``y = x / max(||x / sqrt(d)||_2, 1e-12)``; no learned weight, no epsilon inside the
    square root (as the original). Returns float32 (float64 for a float64 input).

    Parameters
    ----------
    x
        ``(..., d)``.
    """
    x32 = _wide(x)
    return x32 * _inverse_rms(x32)


def _inverse_rms(x32: Tensor) -> Tensor:
    """``1 / max(||x / sqrt(d)||_2, 1e-12)`` over the last dim, ``(..., 1)``, float32.

    The norm is taken of ``x`` and divided by ``sqrt(d)`` afterwards, on the small
    ``(..., 1)`` result: one full-size pass less than scaling ``x`` first.
    """
    d = x32.shape[-1]
    rms = torch.linalg.vector_norm(x32, dim=-1, keepdim=True) * (1.0 / math.sqrt(d))
    return rms.clamp_min(1e-12).reciprocal()


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
        if x.device.type == "cpu" and not x.requires_grad and x.numel() > self.table.in_features:
            # A cell's normalised values take few distinct values (counts are small integers,
            # one total per cell): about 250 distinct values per 7,000 tokens in a batch of 8
            # PBMC cells. Encode each once and gather; the same numbers, a fraction of the
            # (tokens x bins) work. Not on a GPU, where torch.unique waits for the device.
            uniq, inverse = torch.unique(x, return_inverse=True)
            return F.embedding(inverse, self._encode(uniq))  # a row gather
        return self._encode(x)

    def _encode(self, x: Tensor) -> Tensor:
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

    Shapes: ``x (B, S, D)``, ``key_mask (B, S)`` bool, ``len_scale (B,)`` -> ``(B, S, D)``;
    with ``rows=r`` only the first ``r`` positions are queried: ``(B, r, D)`` (keys and
    values still come from all ``S`` positions).

    Notes
    -----
    The key mask, ``len_scale`` and both ``1 / sqrt(hd)`` factors are per-key (or per-cell)
    scalars of a bilinear product, so they are applied together, once, to ``V``: the same
    ``Q (K^T V)`` with one full-size multiplication instead of four. With ``rows`` (the
    cls-only last layer) the V projection is skipped altogether (see ``_few_queries``).
    (Running the four
    input projections as one product of concatenated weights was measured slower on CPU:
    the backward then concatenates the four output gradients, and the element-wise ops
    read strided slices.)
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
        """``(B, S, D)`` -> contiguous ``(B, H, S, hd)``."""
        b, s, _ = t.shape
        return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(
        self, x: Tensor, key_mask: Tensor, len_scale: Tensor, rows: int | None = None
    ) -> Tensor:
        hd = self.head_dim
        # per key: mask * len_scale / hd (the two 1/sqrt(hd) of Q and K, moved onto V)
        w = key_mask.to(len_scale.dtype) * (len_scale / hd).unsqueeze(1)  # (B, S)
        if rows is not None and type(self.v_proj) is nn.Linear and self.v_proj.bias is None:
            return self._few_queries(x, w, rows)
        xq = x if rows is None else x[:, :rows]  # the query positions
        q, k, v, u = self.q_proj(xq), self.k_proj(x), self.v_proj(x), self.u_proj(xq)
        # Heads are made contiguous (B, H, S, hd) before the ReLUs, and K^T V is formed as
        # (V^T K)^T, so every element-wise backward sees one contiguous layout (a ReLU
        # backward over mixed strides was ~6x slower on CPU).
        k = F.relu(self._heads(k))
        v = self._heads(v * w.unsqueeze(-1).to(v.dtype))
        kv = (v.transpose(-1, -2) @ k).transpose(-1, -2)  # K^T V, (B, H, hd, hd)
        o = _wide(F.relu(self._heads(q)) @ kv)  # (B, H, r, hd)
        return self._output(o.transpose(1, 2), u)

    def _output(self, o: Tensor, u: Tensor) -> Tensor:
        """``o_proj(srms(o) * silu(u))`` with heads merged; ``o (B, r, H, hd)``,
        ``u (B, r, D)`` -> ``(B, r, D)``."""
        b, r, h, hd = o.shape
        o = _wide(o)
        o = o * _inverse_rms(o)  # srms over the head dim, float32
        y = _wide(F.silu(u)).view(b, r, h, hd) * o
        return self.o_proj(y.reshape(b, r, h * hd).to(u.dtype))

    def _few_queries(self, x: Tensor, w: Tensor, rows: int) -> Tensor:
        """The output at the first ``rows`` positions without projecting V at all positions.

        Per head ``O_h = Q_h K_h^T (w V_h)`` with ``V_h = x W_vh^T``, so
        ``O_h = (a_h^T x) W_vh^T`` where ``a_h = w * (K_h Q_h^T)`` (``(S, r)`` scores).
        The scores come from one product of ``K`` with a block-diagonal ``(D, H r)`` matrix
        of the queries, ``a_h^T x`` from one more, both ``O(S D H r)``: the ``(S, D) x
        (D, D)`` V projection (a quarter of a full layer's input projections, and its
        backward) is skipped. The same values as the general path up to rounding.
        """
        b, _, d = x.shape
        h, hd = self.num_heads, self.head_dim
        xq = x[:, :rows]
        q, u = F.relu(self.q_proj(xq)), self.u_proj(xq)  # (B, r, D)
        r = q.shape[1]
        k = F.relu(self.k_proj(x))  # (B, S, D)
        # block-diagonal queries: qbd[b, g*hd + e, g'*r + j] = q[b, j, g*hd + e] if g == g'
        eye = torch.eye(h, dtype=q.dtype, device=q.device).view(1, h, 1, h, 1)
        qbd = (q.view(b, r, h, hd).permute(0, 2, 3, 1).unsqueeze(3) * eye).reshape(b, d, h * r)
        a = (k @ qbd) * w.unsqueeze(-1).to(k.dtype)  # (B, S, H r) weighted scores
        z = (a.transpose(1, 2) @ x.to(a.dtype)).view(b, h, r, d)  # (B, H, r, D)
        wv = self.v_proj.weight.view(h, hd, d)
        o = torch.einsum("bhjd,hed->bjhe", z, wv.to(z.dtype))  # (B, r, H, hd)
        return self._output(o, u)


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

    Shapes: ``x (B, S, D)``, ``key_mask (B, S)``, ``len_scale (B,)`` -> ``(B, S, D)``; with
    ``rows=r``, the first ``r`` positions only, ``(B, r, D)`` (what a last layer computes
    when only the cls output is read: every position is still a key).
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

    def forward(
        self, x: Tensor, key_mask: Tensor, len_scale: Tensor, rows: int | None = None
    ) -> Tensor:
        attn = self.dropout1(self.attn(x, key_mask, len_scale, rows))
        if rows is not None:
            x = x[:, :rows]
        # torch.add(a, x, alpha=c) = a + c * x in one pass
        x = self.post_norm1(torch.add(attn, x, alpha=self.alpha))
        return self.post_norm2(torch.add(self.dropout2(self.ffn(x)), x, alpha=self.alpha))
