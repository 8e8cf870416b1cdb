"""The choice lists every layer and the command line share (one home; imports nothing).

Kept free of torch and of the rest of the package so that ``cellfm-sc --help`` can list
the choices without importing the model code.
"""

from __future__ import annotations

__all__ = [
    "CORPUS_SAMPLING",
    "DONOR_LOSSES",
    "DONOR_MONITORS",
    "EMBEDDING_INITS",
    "FINETUNE_RECIPES",
    "LIBRARY_NOISE",
    "LR_SCHEDULES",
    "MONITORS",
    "POOLINGS",
    "PRECISIONS",
    "PRESET_NAMES",
    "PROBE_METHODS",
    "TRAINABLE_POLICIES",
]

#: named trunk sizes (:data:`cellfm_sc.nn.PRESETS` holds their configurations)
PRESET_NAMES: tuple[str, ...] = ("tiny", "small", "80M", "800M")

#: what trains: ``"auto"`` = every parameter the task's forward and loss use
TRAINABLE_POLICIES: tuple[str, ...] = (
    "auto",
    "encoder+head",
    "head",
    "encoder+head+embedding",
    "all",
    "lora",
)

#: initialisation of the new gene-embedding table
EMBEDDING_INITS: tuple[str, ...] = ("random", "transfer")

#: learning-rate schedules of the training core
LR_SCHEDULES: tuple[str, ...] = ("warmup_cosine", "cosine", "step", "constant")

#: Lightning precisions accepted by ``train(precision=...)`` / ``--precision``
PRECISIONS: tuple[str, ...] = (
    "32",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64",
)

#: validation quantities a classifier's model selection can follow
MONITORS: tuple[str, ...] = (
    "auto",
    "validation_loss",
    "validation_acc",
    "validation_macro_f1",
    "validation_donor_qwk",
    "validation_donor_balanced_acc",
)

#: bag pooling of the donor-level model
POOLINGS: tuple[str, ...] = ("gated_attention", "mean", "attention+mean")

#: losses of the donor-level model (``"auto"``: an ordinal loss when the labels are ordered)
DONOR_LOSSES: tuple[str, ...] = ("auto", "cross_entropy", "cumulative_link", "corn")

#: third-party warnings (message regexes) that say nothing a cellfm-sc user can act on; the
#: training core ignores them while it runs Lightning, the command line for the whole run
LIBRARY_NOISE: tuple[str, ...] = (
    r".*isinstance\(treespec, LeafSpec\).*",  # torch's _pytree, called by Lightning
    r".*does not have many workers.*",  # our loaders tokenise in the main process on purpose
    r".*fewer than 3 cells.*",
    r".*weights_only.* was not set.*",
    r".*litlogger.*",
    r".*sync_dist=True.*",
    r".*smaller than the logging interval.*",  # epoch metrics are logged once per epoch
    r".*GPU available but not used.*",
)

#: validation quantities the donor-level model's selection can follow
DONOR_MONITORS: tuple[str, ...] = (
    "auto",
    "validation_loss",
    "validation_donor_score",
    "validation_donor_loss",
    "validation_donor_qwk",
    "validation_donor_acc",
    "validation_donor_balanced_acc",
)

#: fine-tuning recipes of ``CellFMClassifier.train(recipe=...)`` (``"auto"``: the measured
#: winner after a checkpoint, ``"full"`` for a random trunk)
FINETUNE_RECIPES: tuple[str, ...] = (
    "auto",
    "full",
    "lp-ft",
    "llrd",
    "lp-ft+llrd",
    "frozen-rows",
    "shrink-perturb",
)

#: classifiers of the pretraining probe (``EmbeddingProbe(method=...)``)
PROBE_METHODS: tuple[str, ...] = ("knn", "logreg")

#: how a pretraining corpus draws its files' batches each epoch
CORPUS_SAMPLING: tuple[str, ...] = ("proportional", "balanced")
