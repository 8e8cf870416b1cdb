"""The CellFM trunk: gene embedding + value encoder + cls (+ ST) + retention stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cellfm_sc.nn.config import CellFMConfig, padded_rows
from cellfm_sc.nn.decoders import CellwiseDecoder, ValueDecoder
from cellfm_sc.nn.layers import RetentionLayer, SoftBinEncoder, ValueEncoder

__all__ = ["CellFMOutput", "CellFMTrunk", "require_valid_tokens"]


def require_valid_tokens(valid: Tensor) -> None:
    """Raise ``ValueError`` if a cell of the batch has no valid gene token.

    The opt-in form of the precondition of :meth:`CellFMTrunk.forward` (which does not check
    it). It reads the result back to the CPU, so it synchronises with the GPU: use it in
    tests, debugging or input validation, not in a training step.

    Parameters
    ----------
    valid
        ``(B, L)`` bool (or 0/1), True at real gene tokens.

    Examples
    --------
    >>> require_valid_tokens(torch.tensor([[True, False], [False, False]]))
    Traceback (most recent call last):
    ...
    ValueError: 1 cell(s) at batch positions [1] have no valid gene token; a cell with no expressed gene has no defined embedding
    """
    empty = ~valid.bool().any(dim=1)
    if bool(empty.any()):
        bad = torch.nonzero(empty).flatten().tolist()
        raise ValueError(
            f"{len(bad)} cell(s) at batch positions {bad[:5]}{' ...' if len(bad) > 5 else ''} "
            "have no valid gene token; a cell with no expressed gene has no defined embedding"
        )


@dataclass
class CellFMOutput:
    """Trunk outputs.

    Attributes
    ----------
    cls
        ``(B, D)`` cell embedding (the cls token after the last layer).
    hidden
        ``(B, L, D)`` gene positions only (never the cls or ST tokens); rows at invalid
        positions are not meaningful. ``None`` when the forward was asked for the cls
        output only (``return_hidden=False``).
    """

    cls: Tensor
    hidden: Tensor | None


class CellFMTrunk(nn.Module):
    """PyTorch CellFM encoder that reproduces the MindSpore original.

    Parameters
    ----------
    config
        Model hyper-parameters.
    n_genes
        Genes of the vocabulary (token ids ``1..n_genes``; 0 = padding).
    emb_rows
        Rows of ``gene_emb``; default ``n_genes + 1`` rounded up to a multiple of 8.

    Examples
    --------
    >>> trunk = CellFMTrunk(CellFMConfig.from_preset("tiny"), n_genes=100)
    >>> values = torch.rand(2, 5); ids = torch.randint(1, 101, (2, 5))
    >>> out = trunk(values, ids, torch.ones(2, 5, dtype=torch.bool))
    >>> tuple(out.cls.shape), tuple(out.hidden.shape)
    ((2, 64), (2, 5, 64))
    """

    def __init__(self, config: CellFMConfig, n_genes: int, emb_rows: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_genes = int(n_genes)
        rows = padded_rows(n_genes) if emb_rows is None else int(emb_rows)
        if rows < n_genes + 1:
            raise ValueError(f"emb_rows={rows} cannot hold {n_genes} genes plus padding")
        d = config.enc_dims
        self.gene_emb = nn.Parameter(torch.empty(rows, d))
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        if config.zero_emb:
            self.zero_emb = nn.Parameter(torch.zeros(1, 1, d))
        self.value_enc = ValueEncoder(d, config.value_bins, config.leaky_slope)
        if config.st_tokens:
            self.ST_emb = nn.Parameter(torch.empty(1, 2, d))
            self.ST_enc = SoftBinEncoder(d, config.value_bins, config.leaky_slope)
        self.encoder = nn.ModuleList(
            RetentionLayer(
                d,
                config.num_heads,
                config.n_layers,
                dropout=config.dropout * i / config.n_layers,
                ln_eps=config.ln_eps,
            )
            for i in range(config.n_layers)
        )
        if config.decoders:
            self.value_dec = ValueDecoder(d, config.leaky_slope, config.zero_logit)
            self.cellwise_dec = CellwiseDecoder(d, config.zero_logit)
        #: recompute each layer's activations in the backward pass (saves memory for deep
        #: trunks such as the 800M preset at the cost of one more forward)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @property
    def emb_rows(self) -> int:
        """Rows of the gene-embedding table (``n_genes`` + padding, rounded up)."""
        return self.gene_emb.shape[0]

    def reset_parameters(self) -> None:
        """Random initialisation (Xavier normal for tables, padding row 0 zero)."""
        nn.init.xavier_normal_(self.gene_emb)
        with torch.no_grad():
            self.gene_emb[0].zero_()
            self.gene_emb[self.n_genes + 1 :].zero_()
        nn.init.xavier_normal_(self.cls_token)
        if self.config.st_tokens:
            nn.init.xavier_normal_(self.ST_emb)

    def set_dropout(self, p: float) -> None:
        """Encoder dropout ``p`` (layer ``i`` uses ``p * i / n_layers``, as the original)."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        n = len(self.encoder)
        for i, layer in enumerate(self.encoder):
            layer.dropout1.p = layer.dropout2.p = p * i / n

    # ------------------------------------------------------------------ forward
    def embed(
        self, values: Tensor, gene_ids: Tensor, valid: Tensor, unmask: Tensor | None = None
    ) -> Tensor:
        """Token embeddings with the prefix tokens, invalid positions zeroed.

        Shapes: ``values (B, L)``, ``gene_ids (B, L)``, ``valid (B, L)`` ->
        ``(B, n_prefix + L, D)``.
        """
        b = values.shape[0]
        # F.embedding, not gene_emb[gene_ids]: the same rows, and on CPU a faster backward
        tok = self.value_enc(values, unmask) + F.embedding(gene_ids, self.gene_emb)
        tok = tok * valid.unsqueeze(-1).to(tok.dtype)
        prefix = [self.cls_token.expand(b, -1, -1).to(tok.dtype)]
        if self.config.st_tokens:
            prefix.append(self.ST_emb.expand(b, -1, -1).to(tok.dtype))
        return torch.cat([*prefix, tok], dim=1)

    def forward(
        self,
        values: Tensor,
        gene_ids: Tensor,
        valid: Tensor,
        unmask: Tensor | None = None,
        *,
        return_hidden: bool = True,
    ) -> CellFMOutput:
        """Encode cells.

        Parameters
        ----------
        values
            ``(B, L)`` float normalised expression (``log1p(c / T * 1e4)``).
        gene_ids
            ``(B, L)`` int64 token ids (0 = padding).
        valid
            ``(B, L)`` bool, True at real gene tokens. Every cell needs at least one: the
            caller guarantees it (the data path refuses empty cells for training and leaves
            them out of prediction). It is not checked here, because checking means a
            GPU -> CPU synchronisation in every forward; a cell without a valid token gets
            NaN outputs (other cells of the batch are unaffected). Use
            :func:`~cellfm_sc.nn.require_valid_tokens` for an explicit check.
        unmask
            Optional ``(B, L)`` float/bool, 0 where the value is hidden (masked-value
            objective): those tokens take ``value_enc.mask_emb`` instead of their value's
            embedding (their gene embedding stays).
        return_hidden
            ``False``: compute the cls output only. The last layer then queries the cls
            position alone (every position is still a key and value), which skips most of
            that layer's work (in a 2-layer trunk about a third of the matrix products of a
            training step); ``hidden`` is ``None``. The cls output is the same.

        Returns
        -------
        CellFMOutput with ``cls (B, D)`` and ``hidden (B, L, D)`` (or ``None``).
        """
        valid = valid.bool()
        n_valid = valid.sum(dim=1)
        x = self.embed(values, gene_ids, valid, unmask)
        b = x.shape[0]
        n_prefix = self.config.n_prefix
        key_mask = torch.cat([valid.new_ones(b, n_prefix), valid], dim=1)
        len_scale = n_valid.to(torch.float32).rsqrt()
        last = len(self.encoder) - 1
        for i, layer in enumerate(self.encoder):
            rows = 1 if i == last and not return_hidden else None  # the cls row only
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_mask, len_scale, rows, use_reentrant=False)
            else:
                x = layer(x, key_mask, len_scale, rows)
        return CellFMOutput(cls=x[:, 0], hidden=x[:, n_prefix:] if return_hidden else None)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_mindspore(
        cls,
        path: str | Path,
        num_heads: int | None = None,
        max_abs: float | None = 1e6,
        **overrides: Any,
    ) -> CellFMTrunk:
        """Build a trunk from a MindSpore ``.ckpt`` (no MindSpore needed).

        A convenience spelling of :func:`cellfm_sc.io.trunk_from_mindspore` (the one home of
        checkpoint loading; see it for the details), returning the trunk only; the load
        report is kept as ``trunk.load_report``. The variant and dimensions are read from
        parameter names and shapes; ``num_heads`` cannot be, and defaults to 48 only when
        ``enc_dims`` is 1536. A model tensor holding NaN/inf, or a value with
        ``|value| > max_abs`` (``None``: no bound), is refused with a ``CheckpointError``
        naming it.

        Notes
        -----
        This method is the only place in :mod:`cellfm_sc.nn` that reaches another layer: it
        imports ``cellfm_sc.io.mapping`` when called (never at import time, so
        ``import cellfm_sc.nn`` loads nothing of :mod:`cellfm_sc.io`). A method of the
        trunk class that reads a file has to get the reader from somewhere at call time; a
        registry filled by :mod:`cellfm_sc.io` would fail whenever ``cellfm_sc.io`` has not
        been imported yet, and any other indirection hides the same dependency. The builder
        it calls is given the class and does not import this module, so the edge closes no
        import cycle; the test suite checks both.
        """
        from cellfm_sc.io.mapping import build_trunk  # the one allowed upward edge

        trunk, _ = build_trunk(cls, path, num_heads=num_heads, max_abs=max_abs, **overrides)
        return trunk
