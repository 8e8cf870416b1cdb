"""The torch module of :class:`~cellfm_sc.model.CellFMPretrainer`: CellFM's masked-value objective.

The original's pretraining forward, written from its specification (checked against the MindSpore
golden outputs ``golden_*_cellfm_padzero__masked3d.npz``):

* per cell, ``round(mask_ratio * n_valid)`` valid gene tokens are **selected** at random; of
  those, in the random order of the draw, the first ``floor(hide_fraction * n_selected)`` are
  **hidden** (``unmask = 0``: the value embedding becomes ``value_enc.mask_emb``, the gene
  embedding stays) and the others keep their value (:func:`select_masked_tokens`);
* hidden tokens are no keys in the first half of the retention layers (layers
  ``0 .. n_layers // 2 - 1`` use the key mask ``valid & unmask``, the later ones ``valid``),
  as the original's pretraining forward does;
* the value decoder predicts each token's value from its output, the cellwise decoder from the
  cls embedding and the gene's embedding row; the loss is the sum of the two mean squared
  errors over the selected tokens of the batch, in float32 (:meth:`CellFMPretrainModule.loss`).

No step of the objective reads a tensor back to the host (no ``.item()``, no boolean
indexing): the masks are drawn, counted and applied on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cellfm_sc.data import TokenBatch
from cellfm_sc.nn import CellFMTrunk

__all__ = [
    "HIDE_FRACTION",
    "CellFMPretrainModule",
    "MaskedValueLoss",
    "MaskedValueOutput",
    "select_masked_tokens",
]

#: share of the selected tokens whose value is hidden (the rest keep it), as the original
HIDE_FRACTION = 0.8


def select_masked_tokens(
    valid: Tensor,
    mask_ratio: float = 0.2,
    hide_fraction: float = HIDE_FRACTION,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw the selected and hidden tokens of every cell.

    Each cell's valid tokens are put in a uniformly random order; the first
    ``round(mask_ratio * n_valid)`` are selected and, of those, the first
    ``floor(hide_fraction * n_selected)`` hidden. Padding is never selected.

    Parameters
    ----------
    valid
        ``(B, L)`` bool, True at real gene tokens.
    mask_ratio
        Share of each cell's tokens selected for the loss (0.2 as CellFM).
    hide_fraction
        Share of the selected tokens hidden (0.8 as CellFM).
    generator
        Optional ``torch.Generator`` on ``valid``'s device (seeded draws, e.g. validation).

    Returns
    -------
    ``(selected, hidden)``, both bool ``(B, L)``; ``hidden`` implies ``selected``.

    Examples
    --------
    >>> valid = torch.ones(1, 10, dtype=torch.bool)
    >>> sel, hid = select_masked_tokens(valid, 0.5)
    >>> int(sel.sum()), int(hid.sum())
    (5, 4)
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if not 0.0 <= hide_fraction <= 1.0:
        raise ValueError(f"hide_fraction must be in [0, 1], got {hide_fraction}")
    valid = valid.bool()
    b, length = valid.shape
    n_valid = valid.sum(dim=1)
    n_selected = torch.round(n_valid.to(torch.float32) * mask_ratio)
    # floor with a small tolerance: 0.8 * 5 must give 4 however the product rounds
    n_hidden = torch.floor(n_selected * hide_fraction + 1e-6)
    scores = torch.rand(b, length, device=valid.device, generator=generator)
    scores = scores.masked_fill(~valid, 2.0)  # padding sorts last
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(length, device=valid.device).expand(b, length))
    selected = rank < n_selected.to(rank.dtype).unsqueeze(1)
    hidden = rank < n_hidden.to(rank.dtype).unsqueeze(1)
    return selected & valid, hidden & valid


@dataclass
class MaskedValueOutput:
    """Outputs of the pretraining forward.

    Attributes
    ----------
    value_pred
        ``(B, L)`` value decoder's prediction per token.
    cell_pred
        ``(B, L)`` cellwise decoder's prediction per token.
    cls
        ``(B, D)`` cell embedding.
    value_zero, cell_zero
        ``(B, L)`` zero probabilities of ``zero_logit`` checkpoints (``add_zero``), else None.
    """

    value_pred: Tensor
    cell_pred: Tensor
    cls: Tensor
    value_zero: Tensor | None = None
    cell_zero: Tensor | None = None


@dataclass
class MaskedValueLoss:
    """The masked-value loss of a batch and the sums behind it (all float32 scalars).

    Attributes
    ----------
    loss
        ``value_mse + cellwise_mse`` (plus the zero BCE terms when zero-valued tokens are
        present): what is back-propagated.
    se_value, se_cell
        Weighted sums of squared errors over the selected tokens.
    n_selected
        Weighted number of selected tokens (the denominator).
    bce
        Weighted sum of the zero-probability BCE terms over the selected tokens (0 without
        ``zero_logit`` heads or zero-valued tokens).
    """

    loss: Tensor
    se_value: Tensor
    se_cell: Tensor
    n_selected: Tensor
    bce: Tensor


class CellFMPretrainModule(nn.Module):
    """CellFM trunk with its value and cellwise decoders: the masked-value objective.

    Parameters
    ----------
    trunk
        A :class:`~cellfm_sc.nn.CellFMTrunk` with decoders (``config.decoders``; variant A
        checkpoints or presets). The annotation Backbone (variant A') has none.
    mask_ratio
        Share of each cell's tokens selected for the loss.
    hide_fraction
        Share of the selected tokens whose value is hidden.
    """

    def __init__(
        self, trunk: CellFMTrunk, mask_ratio: float = 0.2, hide_fraction: float = HIDE_FRACTION
    ) -> None:
        super().__init__()
        if not trunk.config.decoders:
            raise ValueError(
                "pretraining needs the value and cellwise decoders, which this trunk lacks "
                "(an annotation-Backbone checkpoint, variant A'); continue from a variant-A "
                "CellFM checkpoint or start from a preset"
            )
        if not 0.0 < mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
        self.trunk = trunk
        self.mask_ratio = float(mask_ratio)
        self.hide_fraction = float(hide_fraction)

    def select(
        self, valid: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """:func:`select_masked_tokens` with this module's ratios."""
        return select_masked_tokens(valid, self.mask_ratio, self.hide_fraction, generator)

    def encode(
        self, values: Tensor, gene_ids: Tensor, valid: Tensor, hidden: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The trunk's pretraining forward: ``(cls (B, D), hidden states (B, L, D))``.

        ``hidden`` ``(B, L)`` bool marks tokens whose value is replaced by ``mask_emb``; they
        are no keys in the first ``n_layers // 2`` layers. Without ``hidden`` this is the
        trunk's ordinary forward.
        """
        trunk = self.trunk
        valid = valid.bool()
        unmask = None if hidden is None else (~hidden).to(values.dtype)
        x = trunk.embed(values, gene_ids, valid, unmask)
        b = x.shape[0]
        ones = valid.new_ones(b, trunk.config.n_prefix)
        late = torch.cat([ones, valid], dim=1)
        early = late if hidden is None else torch.cat([ones, valid & ~hidden], dim=1)
        len_scale = valid.sum(dim=1).to(torch.float32).rsqrt()
        n_early = len(trunk.encoder) // 2
        for i, layer in enumerate(trunk.encoder):
            key_mask = early if i < n_early else late
            if trunk.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_mask, len_scale, use_reentrant=False)
            else:
                x = layer(x, key_mask, len_scale)
        n_prefix = trunk.config.n_prefix
        return x[:, 0], x[:, n_prefix:]

    def forward(self, batch: TokenBatch, hidden: Tensor | None = None) -> MaskedValueOutput:
        """Decoders' predictions for every token of ``batch`` with ``hidden`` values masked.

        Shapes: ``batch.values (B, L)``; ``hidden (B, L)`` bool -> :class:`~cellfm_sc.model._pretrain_module.MaskedValueOutput`.
        """
        cls, states = self.encode(batch.values, batch.gene_ids, batch.valid, hidden)
        value_pred, value_zero = self.trunk.value_dec(states)
        cell_pred, cell_zero = self.trunk.cellwise_dec(cls, self.trunk.gene_emb[batch.gene_ids])
        return MaskedValueOutput(value_pred, cell_pred, cls, value_zero, cell_zero)

    @staticmethod
    def loss(
        out: MaskedValueOutput,
        values: Tensor,
        selected: Tensor,
        valid: Tensor,
        weight: Tensor | None = None,
    ) -> MaskedValueLoss:
        """Masked-value loss over the selected tokens, float32.

        ``loss = sum_sel w (value_pred - x)^2 / sum_sel w + sum_sel w (cell_pred - x)^2 /
        sum_sel w``, with ``w`` the cell's weight (0 for distributed padding copies). With
        ``zero_logit`` heads, the two binary cross-entropies of the zero probabilities against
        ``x == 0`` (same average) are added when the batch holds a valid zero-valued token;
        cellfm-sc's data path only makes tokens of expressed genes, so they are then off.

        Parameters
        ----------
        out
            :meth:`forward`'s outputs.
        values
            ``(B, L)`` the true normalised values ``x``.
        selected
            ``(B, L)`` bool, the tokens that count.
        valid
            ``(B, L)`` bool, real tokens.
        weight
            ``(B,)`` per-cell weight, default 1.
        """
        x = values.float()
        w = selected.float()
        if weight is not None:
            w = w * weight.float().unsqueeze(1)
        n = w.sum()
        denom = n.clamp(min=1.0)
        se_value = ((out.value_pred.float() - x) ** 2 * w).sum()
        se_cell = ((out.cell_pred.float() - x) ** 2 * w).sum()
        bce = x.new_zeros(())
        if out.value_zero is not None and out.cell_zero is not None:
            is_zero = (x == 0) & valid.bool()
            present = is_zero.any().float()  # stays on the device
            target = is_zero.float()
            for prob in (out.value_zero, out.cell_zero):
                p = prob.float().clamp(1e-7, 1 - 1e-7)
                term = F.binary_cross_entropy(p, target, reduction="none")
                bce = bce + (term * w).sum()
            bce = bce * present
        loss = (se_value + se_cell + bce) / denom
        return MaskedValueLoss(loss, se_value, se_cell, n, bce)

    def masked_loss(
        self,
        batch: TokenBatch,
        generator: torch.Generator | None = None,
    ) -> tuple[MaskedValueOutput, MaskedValueLoss]:
        """Draw the masks, run the forward and compute the loss of one batch."""
        selected, hidden = self.select(batch.valid, generator)
        out = self(batch, hidden)
        return out, self.loss(out, batch.values, selected, batch.valid, batch.weight)
