"""The pretrainer's training plan: CellFM's masked-value loss and its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cellfm_sc.data import TokenBatch
from cellfm_sc.train._plan import StepOutput, TrainingPlan

__all__ = ["PretrainingPlan"]


#: seed offset of the validation masks (fixed, so validation losses compare across epochs)
_VALIDATION_STREAM = 0x5EED


class PretrainingPlan(TrainingPlan):
    """Masked-value loss; exact epoch metrics over every selected token.

    Training draws fresh masks every step; validation draws them from a generator reset to
    ``seed`` at the start of every validation run, so each validation cell gets the same
    masks every epoch and the validation loss is comparable across epochs.

    Metrics (history columns ``train_<k>`` / ``validation_<k>``): ``loss`` (value MSE +
    cellwise MSE, plus the zero BCE terms when they apply), ``value_mse``, ``cellwise_mse``,
    all over the selected tokens of the epoch (sums, reduced across processes). The sums
    ``"loss"``/``"tokens"`` are token sums, not cell sums; ``"n"`` counts cells.

    Parameters
    ----------
    module
        The pretraining module.
    seed
        Seed of the validation masks.
    **kwargs
        :class:`~cellfm_sc.train.TrainingPlan` settings (lr, schedule, ...).
    """

    _checkpointed = ("probe_initial",)

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        seed: int = 0,
        probes: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(module, **kwargs)
        self.seed = int(seed)
        self.probes = dict(probes or {})
        self.probe_initial: dict[str, float] | None = None
        self._generator: torch.Generator | None = None

    def on_train_start(self) -> None:
        # the probes of the weights training starts from (a random trunk: the baseline)
        if self.probes and self.probe_initial is None and not self.history:
            self.probe_initial = {
                column: p.score(self.module.trunk) for column, p in self.probes.items()
            }

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        for column, p in self.probes.items():
            score = p.score(self.module.trunk)
            self.history[-1][column] = score
            self.log(column, score, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed + _VALIDATION_STREAM)

    def step(self, batch: TokenBatch, stage: str) -> StepOutput:
        generator = None if stage == "train" else self._generator
        _, parts = self.module.masked_loss(batch, generator)
        weight = batch.weight.to(parts.loss.dtype)
        sums = {
            "loss": (parts.se_value + parts.se_cell + parts.bce).detach(),
            "se_value": parts.se_value.detach(),
            "se_cell": parts.se_cell.detach(),
            "tokens": parts.n_selected.detach(),
            "n": weight.sum(),
        }
        return StepOutput(loss=parts.loss, sums=sums)

    def metrics_from_sums(self, sums: Mapping[str, float]) -> dict[str, float]:
        tokens = sums.get("tokens", 0.0)
        if not tokens:
            return {"loss": float("nan"), "value_mse": float("nan"), "cellwise_mse": float("nan")}
        return {
            "loss": sums["loss"] / tokens,
            "value_mse": sums["se_value"] / tokens,
            "cellwise_mse": sums["se_cell"] / tokens,
        }
