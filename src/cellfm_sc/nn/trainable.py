"""Freezing policies: which parameters train."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from cellfm_sc._constants import TRAINABLE_POLICIES

__all__ = [
    "LORA_TARGETS",
    "TRAINABLE_POLICIES",
    "TrainableSummary",
    "apply_trainable",
    "merge_lora",
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
