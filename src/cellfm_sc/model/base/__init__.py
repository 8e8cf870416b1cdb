"""The base of every model class: :class:`CellFMModel` and its parts.

``_model`` (construction, data access, split bookkeeping), ``_training`` (the one ``train``
template), ``_inference`` (the forward pass over cells, the cell embedding) and ``_saving``
(``save`` / ``load`` from one declaration per class).
"""

from cellfm_sc._errors import UntrainedModelError
from cellfm_sc.model.base._inference import inference_args
from cellfm_sc.model.base._model import CellFMModel, trunk_args
from cellfm_sc.model.base._saving import Saved, model_not_set_up, saved_rows
from cellfm_sc.model.base._training import TrainingRun, auto_lr, train_doc

__all__ = [
    "CellFMModel",
    "Saved",
    "TrainingRun",
    "UntrainedModelError",
    "auto_lr",
    "inference_args",
    "model_not_set_up",
    "saved_rows",
    "train_doc",
    "trunk_args",
]
