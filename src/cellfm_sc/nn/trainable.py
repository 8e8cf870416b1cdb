"""Freezing policies (which parameters train) and fine-tuning recipes (when, at which rate)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cellfm_sc._constants import FINETUNE_RECIPES, TRAINABLE_POLICIES

__all__ = [
    "AUTO_RECIPES",
    "LORA_TARGETS",
    "RECIPES",
    "TRAINABLE_POLICIES",
    "FinetuneRecipe",
    "ParamGroup",
    "RowRateScaler",
    "TrainableSummary",
    "apply_trainable",
    "merge_lora",
    "recipe_param_groups",
    "resolve_recipe",
]

# parameters of the trunk that the classification forward never uses (pretraining inputs,
# decoders, the ST encoder that only the public port's training used)
_UNUSED_BY_FORWARD = ("value_dec.", "cellwise_dec.", "zero_emb", "value_enc.mask_emb", "ST_enc.")
# every retention and gated-unit projection of every layer
LORA_TARGETS = r".*encoder\.\d+\.(attn\.[qkvuo]_proj|ffn\.[uvo]_proj)"


@dataclass
class TrainableSummary:
    """Result of :func:`~cellfm_sc.nn.apply_trainable`.

    Examples
    --------
    >>> from cellfm_sc.nn import CellFMConfig, CellFMTrunk
    >>> trunk = CellFMTrunk(CellFMConfig.from_preset("tiny"), n_genes=10)
    >>> print(apply_trainable(trunk, "all", trunk_prefix=""))  # doctest: +ELLIPSIS
    trainable (all): ... parameters (100.0%) in ... tensors
    """

    policy: str
    n_trainable: int
    n_total: int
    trainable: list[str]

    def __str__(self) -> str:
        pct = 100.0 * self.n_trainable / max(self.n_total, 1)
        return (
            f"trainable ({self.policy}): {self.n_trainable:,} of {self.n_total:,} parameters "
            f"({pct:.1f}%) in {len(self.trainable)} tensors"
        )


def _rule(policy: str, trunk_prefix: str, head_prefix: str):
    enc = f"{trunk_prefix}encoder."
    emb = f"{trunk_prefix}gene_emb"
    unused = tuple(f"{trunk_prefix}{n}" for n in _UNUSED_BY_FORWARD)
    rules = {
        "auto": lambda n: (
            n.startswith(head_prefix) or (n.startswith(trunk_prefix) and not n.startswith(unused))
        ),
        "head": lambda n: n.startswith(head_prefix),
        "encoder+head": lambda n: n.startswith((head_prefix, enc)),
        "encoder+head+embedding": lambda n: n.startswith((head_prefix, enc)) or n == emb,
        "all": lambda n: True,
        "lora": lambda n: n.startswith(head_prefix) or "lora_" in n,
    }
    return rules[policy]


def apply_trainable(
    model: nn.Module,
    policy: str = "auto",
    *,
    trunk_prefix: str = "trunk.",
    head_prefix: str = "head.",
    also: tuple[str, ...] = (),
    rank: int = 8,
    alpha: int = 16,
    lora_dropout: float = 0.0,
) -> TrainableSummary:
    """Set ``requires_grad`` by name according to a policy.

    Parameters
    ----------
    model
        A module holding the trunk under ``trunk_prefix`` and the head under ``head_prefix``
        (a bare :class:`~cellfm_sc.nn.CellFMTrunk` works with ``trunk_prefix=""``).
    policy
        ``"auto"`` (default): every parameter the classification forward uses (gene
        embedding, value encoder, cls/ST tokens, retention layers, head), never the decoders,
        ``mask_emb``, ``zero_emb`` or ``ST_enc`` (a loss that uses them names them in
        ``also``). ``"encoder+head"`` (the original scripts' policy: retention layers and head
        train; gene embedding, value encoder, cls/ST tokens and decoders frozen), ``"head"``,
        ``"encoder+head+embedding"``, ``"all"`` (every parameter, unused ones included), or
        ``"lora"`` (LoRA adapters of ``rank``/``alpha``/``lora_dropout`` on every retention
        and gated-unit projection via ``peft``; base weights frozen; head trains).
    also
        Name prefixes that train in addition to the policy's (relative to ``trunk_prefix``
        when they start with a trunk attribute, e.g. ``("value_dec.", "value_enc.mask_emb")``
        for the masked-value objective).

    Returns
    -------
    TrainableSummary with trainable/total counts and names.

    Examples
    --------
    >>> from cellfm_sc.nn import CellFMConfig, CellFMTrunk
    >>> trunk = CellFMTrunk(CellFMConfig.from_preset("tiny"), n_genes=10)
    >>> apply_trainable(trunk, "encoder+head", trunk_prefix="").trainable[0]
    'encoder.0.attn.q_proj.weight'
    """
    if policy not in TRAINABLE_POLICIES:
        raise ValueError(f"unknown trainable policy {policy!r}; choose one of {TRAINABLE_POLICIES}")
    if policy == "lora" and not any("lora_" in n for n, _ in model.named_parameters()):
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "trainable='lora' needs the optional 'peft' package: pip install 'cellfm-sc[lora]'"
            ) from err
        pattern = re.escape(trunk_prefix) + LORA_TARGETS[2:] if trunk_prefix else LORA_TARGETS
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=pattern
        )
        inject_adapter_in_model(config, model)
    rule = _rule(policy, trunk_prefix, head_prefix)
    extra = tuple(f"{trunk_prefix}{a}" for a in also)
    keep = (lambda n: rule(n) or n.startswith(extra)) if extra else rule
    names = []
    n_train = n_total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(keep(name))
        n_total += param.numel()
        if param.requires_grad:
            n_train += param.numel()
            names.append(name)
    return TrainableSummary(policy=policy, n_trainable=n_train, n_total=n_total, trainable=names)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge LoRA adapters into plain ``nn.Linear`` weights, in place; returns ``model``.

    After merging the module holds no ``lora_`` parameter and its state dict has the plain
    trunk names, so it can be saved or exported to MindSpore.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


# --------------------------------------------------------------------------------------------
# fine-tuning recipes: parameter groups, their learning rates and phases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneRecipe:
    """How a (pretrained) trunk is fine-tuned: which parameters train when, at which rate.

    Rates are multiples of the run's learning rate ``lr``, which is the head's. "Pretrained"
    means the trunk's parameters (gene embedding, value encoder, cls/ST tokens, retention
    layers); "new" means the head and the re-initialised rows of the gene embedding (genes
    the checkpoint does not know), which always train at ``lr``.

    Attributes
    ----------
    name
        The recipe's name (``"custom"`` for one built by hand).
    head_phase
        Share of the optimizer steps at the start during which only the head trains, on
        frozen features (a linear probe, LP, when the head is linear); the rest train from
        then on, with their own warm-up (LP-FT, Kumar et al. 2022). 0: no such phase.
    pretrained_lr
        Rate of the top retention layer relative to ``lr``.
    layer_decay
        Layer-wise decay: retention layer ``i`` of ``n`` trains at ``pretrained_lr *
        layer_decay ** (n - 1 - i)``, the input level (gene embedding, value encoder, tokens)
        at ``pretrained_lr * layer_decay ** n`` (Clark et al. 2020; 1: no decay).
    transferred_rows_lr
        Rate of the gene-embedding rows transferred from the checkpoint relative to the
        input level's; 0 freezes them (the re-initialised rows still train at ``lr``).
    interpolate
        Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): the kept weights are
        ``interpolate * fine-tuned + (1 - interpolate) * start``, the start being the weights
        at the end of the head phase (pretrained trunk, probed head); needs ``head_phase >
        0`` when below 1. 1: no interpolation.
    shrink
        Shrink-and-perturb start (Ash & Adams 2020): before the first step the trunk's
        weights become ``shrink * pretrained + (1 - shrink) * fresh``, ``fresh`` a new random
        initialisation of the same trunk (seeded by the run's seed). Warm-started networks
        can generalise worse than fresh ones when labels are plentiful; this keeps part of
        the pretrained weights and restores some of a fresh network's. 1: the pretrained
        weights as they are.

    Examples
    --------
    >>> FinetuneRecipe.named("lp-ft").head_phase
    0.25
    >>> FinetuneRecipe.named("llrd").replace(layer_decay=0.5).name
    'llrd (custom)'
    """

    name: str = "custom"
    head_phase: float = 0.0
    pretrained_lr: float = 1.0
    layer_decay: float = 1.0
    transferred_rows_lr: float = 1.0
    interpolate: float = 1.0
    shrink: float = 1.0

    def __post_init__(self) -> None:
        checks = (
            ("head_phase", 0.0 <= self.head_phase < 1.0, "in [0, 1)"),
            ("pretrained_lr", self.pretrained_lr > 0, "> 0"),
            ("layer_decay", 0 < self.layer_decay <= 1, "in (0, 1]"),
            ("transferred_rows_lr", self.transferred_rows_lr >= 0, ">= 0"),
            ("interpolate", 0 <= self.interpolate <= 1, "in [0, 1]"),
            ("shrink", 0 <= self.shrink <= 1, "in [0, 1]"),
        )
        for field_name, ok, what in checks:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"recipe {field_name} must be a number, got {value!r}")
            if not (math.isfinite(value) and ok):
                raise ValueError(f"recipe {field_name} must be {what}, got {value!r}")
        if self.interpolate < 1 and self.head_phase == 0:
            raise ValueError(
                "recipe interpolate < 1 needs a head phase (head_phase > 0): the weights at "
                "its end are what the fine-tuned weights are interpolated with"
            )

    @classmethod
    def named(cls, name: str) -> FinetuneRecipe:
        """The named recipe (``"full"``, ``"lp-ft"``, ``"llrd"``, ``"lp-ft+llrd"``,
        ``"frozen-rows"``, ``"shrink-perturb"``; ``"auto"`` is resolved by
        :func:`~cellfm_sc.nn.resolve_recipe`)."""
        if name not in RECIPES:
            choices = tuple(r for r in FINETUNE_RECIPES if r != "auto")
            raise ValueError(f"recipe must be 'auto' or one of {choices}, got {name!r}")
        return RECIPES[name]

    def replace(self, **changes: Any) -> FinetuneRecipe:
        """A copy with other settings (named ``"<name> (custom)"``)."""
        name = changes.pop("name", None)
        if name is None:
            name = self.name if self.name.endswith("(custom)") else f"{self.name} (custom)"
        return dataclasses.replace(self, name=name, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python settings (for ``train_settings_``)."""
        return dataclasses.asdict(self)


#: the named recipes of ``CellFMClassifier.train(recipe=...)``
RECIPES: dict[str, FinetuneRecipe] = {
    # one rate for everything from the first step (the library's recipe before recipes)
    "full": FinetuneRecipe("full"),
    # the head first on frozen features, then everything, the trunk at a lower rate
    "lp-ft": FinetuneRecipe("lp-ft", head_phase=0.25, pretrained_lr=0.3),
    # lower rates for pretrained parameters, decaying towards the input
    "llrd": FinetuneRecipe("llrd", pretrained_lr=0.3, layer_decay=0.7),
    "lp-ft+llrd": FinetuneRecipe("lp-ft+llrd", head_phase=0.25, pretrained_lr=0.3, layer_decay=0.7),
    # transferred gene-embedding rows frozen, everything else at one rate
    "frozen-rows": FinetuneRecipe("frozen-rows", transferred_rows_lr=0.0),
    # everything at one rate from a start halfway between the pretrained and a fresh trunk
    "shrink-perturb": FinetuneRecipe("shrink-perturb", shrink=0.5),
}


#: what ``recipe="auto"`` means: for a pretrained trunk the recipe that won the shift
#: benchmark (``benchmarks/shift_transfer.py``), for a random trunk one rate for everything
AUTO_RECIPES: dict[str, str] = {"pretrained": "full", "random": "full"}


def resolve_recipe(recipe: str | FinetuneRecipe, pretrained: bool) -> FinetuneRecipe:
    """The :class:`~cellfm_sc.nn.FinetuneRecipe` of a ``recipe=`` argument.

    ``"auto"``: for a pretrained trunk the recipe that won the shift benchmark
    (``AUTO_RECIPES["pretrained"]``), for a random trunk ``"full"``.
    """
    if isinstance(recipe, FinetuneRecipe):
        return recipe
    if not isinstance(recipe, str):
        raise TypeError(f"recipe must be a name or a FinetuneRecipe, got {type(recipe).__name__}")
    if recipe == "auto":
        recipe = AUTO_RECIPES["pretrained" if pretrained else "random"]
    return FinetuneRecipe.named(recipe)


@dataclass
class ParamGroup:
    """One optimizer parameter group of a recipe.

    Attributes
    ----------
    name
        ``"head"``, ``"encoder.{i}"``, ``"input"`` (embedding level), ``"gene_emb"``,
        ``"new"`` (LoRA adapters) or ``"other"`` (e.g. decoders of an auxiliary loss).
    params
        The parameters (all with ``requires_grad``).
    lr_scale
        Learning rate relative to the run's ``lr``.
    phase
        0: trains from the first step; 1: from the end of the head phase on.
    rows, rows_scale
        For ``gene_emb``: the rows (int64 tensor) whose updates are scaled by ``rows_scale``
        relative to the group's rate (see :class:`~cellfm_sc.nn.RowRateScaler`), or None.
    """

    name: str
    params: list[torch.Tensor]
    lr_scale: float
    phase: int = 0
    rows: torch.Tensor | None = None
    rows_scale: float = 1.0


def recipe_param_groups(
    module: nn.Module,
    recipe: FinetuneRecipe,
    *,
    n_layers: int,
    transferred_rows: Sequence[int] | torch.Tensor | None = None,
    trunk_prefix: str = "trunk.",
    head_prefix: str = "head.",
) -> list[ParamGroup]:
    """The trainable parameters of ``module`` split into a recipe's groups.

    Parameters
    ----------
    module
        The trunk under ``trunk_prefix`` and the head under ``head_prefix``; only
        parameters with ``requires_grad`` (the trainable policy's) are grouped.
    recipe
        Rates and phases (:class:`~cellfm_sc.nn.FinetuneRecipe`).
    n_layers
        Retention layers of the trunk.
    transferred_rows
        Gene-embedding rows that came from the checkpoint (``embedding_init="transfer"``);
        None or empty: every row is new (trains at ``lr``).

    Returns
    -------
    Non-empty groups, the head first.
    """
    later = 1 if recipe.head_phase > 0 else 0
    top = recipe.pretrained_lr
    input_scale = top * recipe.layer_decay**n_layers
    layer_re = re.compile(re.escape(trunk_prefix) + r"encoder\.(\d+)\.")
    gene_emb = f"{trunk_prefix}gene_emb"
    input_names = tuple(
        f"{trunk_prefix}{n}" for n in ("value_enc.", "cls_token", "ST_emb", "ST_enc.", "zero_emb")
    )
    buckets: dict[str, list[torch.Tensor]] = {}
    scales: dict[str, tuple[float, int]] = {"head": (1.0, 0)}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        match = layer_re.match(name)
        if name.startswith(head_prefix):
            key = "head"
        elif "lora_" in name:
            key = "new"
            scales[key] = (1.0, later)
        elif match:
            i = int(match.group(1))
            key = f"encoder.{i}"
            scales[key] = (top * recipe.layer_decay ** (n_layers - 1 - i), later)
        elif name == gene_emb:
            key = "gene_emb"
        elif name.startswith(input_names):
            key = "input"
            scales[key] = (input_scale, later)
        else:
            key = "other"
            scales[key] = (top, later)
        buckets.setdefault(key, []).append(param)
    groups = []
    order = ["head", "new", *(f"encoder.{i}" for i in reversed(range(n_layers))), "input"]
    order += ["gene_emb", "other"]
    for key in order:
        if key not in buckets:
            continue
        if key == "gene_emb":
            groups.append(
                _gene_emb_group(buckets[key][0], recipe, input_scale, later, transferred_rows)
            )
            continue
        scale, phase = scales[key]
        groups.append(ParamGroup(key, buckets[key], scale, phase))
    return groups


def _gene_emb_group(
    param: torch.Tensor,
    recipe: FinetuneRecipe,
    input_scale: float,
    phase: int,
    transferred: Sequence[int] | torch.Tensor | None,
) -> ParamGroup:
    rows = None if transferred is None else torch.as_tensor(transferred, dtype=torch.long)
    transferred_scale = input_scale * recipe.transferred_rows_lr
    if rows is None or rows.numel() == 0:  # every row new
        return ParamGroup("gene_emb", [param], 1.0, phase)
    n_real = int(param.shape[0])
    if rows.numel() >= n_real - 1 and transferred_scale > 0:  # every row (but padding) transferred
        return ParamGroup("gene_emb", [param], transferred_scale, phase)
    # new rows at lr, transferred rows scaled down to their rate
    return ParamGroup("gene_emb", [param], 1.0, phase, rows=rows, rows_scale=transferred_scale)


class RowRateScaler:
    """Gives some rows of a parameter their own learning rate within one optimizer group.

    AdamW's update is elementwise and linear in the learning rate (its decoupled weight decay
    too), so scaling the update of ``rows`` by ``scale`` after each step is exactly what a
    separate group at ``scale`` times the rate would do; ``scale=0`` freezes the rows exactly.
    The rows' values are copied before each step (``rows x D`` floats).

    Parameters
    ----------
    param
        The parameter (e.g. the gene embedding ``(rows, D)``).
    rows
        int64 row indices.
    scale
        Update factor of those rows.
    """

    def __init__(self, param: torch.Tensor, rows: torch.Tensor, scale: float) -> None:
        self.param, self.scale = param, float(scale)
        self.rows = rows.to(param.device)
        self._before: torch.Tensor | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> list[Any]:
        """Register the pre-/post-step hooks on ``optimizer``; returns their handles."""
        return [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    @torch.no_grad()
    def _pre(self, *_: Any) -> None:
        if self.rows.device != self.param.device:
            self.rows = self.rows.to(self.param.device)
        self._before = self.param.detach()[self.rows].clone()

    @torch.no_grad()
    def _post(self, *_: Any) -> None:
        if self._before is None:
            return
        after = self.param.detach()[self.rows]
        self.param.data[self.rows] = self._before + self.scale * (after - self._before)
        self._before = None


def shrink_towards_fresh(trunk: nn.Module, shrink: float) -> int:
    """Shrink-and-perturb a trunk in place: ``w <- shrink * w + (1 - shrink) * w_fresh``.

    ``w_fresh`` are the weights of a new trunk of the same configuration (``type(trunk)(
    config, n_genes, emb_rows=)``), drawn from torch's global generator (seeded by the run);
    parameters without a fresh counterpart of the same shape (e.g. LoRA adapters) are left
    as they are. Returns the number of parameters changed.
    """
    if not 0 <= shrink <= 1:
        raise ValueError(f"shrink must be in [0, 1], got {shrink!r}")
    fresh = type(trunk)(trunk.config, trunk.n_genes, emb_rows=trunk.emb_rows)
    fresh_params = dict(fresh.named_parameters())
    changed = 0
    with torch.no_grad():
        for name, p in trunk.named_parameters():
            f = fresh_params.get(name)
            if f is not None and f.shape == p.shape:
                p.mul_(shrink).add_(f.to(p.device, p.dtype), alpha=1.0 - shrink)
                changed += 1
    return changed
