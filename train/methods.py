"""The registry of training methods a recipe can name in `stagesweep.method`.

A string enum with behaviour properties (open-instruct style) instead of if-chains: each method
says which TRL config and trainer it uses, what shape of data it eats, and which config values
it pins. Classes are named by import path so reading a recipe never imports trl.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class DataFormat(StrEnum):
    """The columns a method's dataset must have (TRL's own dataset formats)."""

    LANGUAGE_MODELING = "language_modeling"  # SFT: messages, text, or prompt / completion
    PREFERENCE = "preference"  # (prompt /) chosen / rejected
    UNPAIRED = "unpaired"  # KTO: prompt / completion / label, or pairs TRL unpairs

    @property
    def column_sets(self) -> tuple[frozenset[str], ...]:
        """Alternative sets of columns, any one of which the trainer accepts."""
        return {
            DataFormat.LANGUAGE_MODELING: (
                frozenset({"messages"}), frozenset({"text"}),
                frozenset({"prompt", "completion"}),
            ),
            DataFormat.PREFERENCE: (frozenset({"chosen", "rejected"}),),
            DataFormat.UNPAIRED: (
                frozenset({"prompt", "completion", "label"}), frozenset({"chosen", "rejected"}),
            ),
        }[self]

    def accepts(self, columns: list[str]) -> bool:
        return any(needed <= set(columns) for needed in self.column_sets)


class Method(StrEnum):
    SFT = "sft"
    DPO = "dpo"
    KTO = "kto"
    ORPO = "orpo"
    CPO = "cpo"
    SIMPO = "simpo"
    CUSTOM = "custom"

    @property
    def config_class_path(self) -> str:
        """Import path of the TRL config dataclass whose fields a recipe may set."""
        return _CLASSES[self][0]

    @property
    def trainer_class_path(self) -> str:
        return _CLASSES[self][1]

    @property
    def data_format(self) -> DataFormat:
        if self is Method.SFT:
            return DataFormat.LANGUAGE_MODELING
        if self is Method.KTO:
            return DataFormat.UNPAIRED
        return DataFormat.PREFERENCE

    @property
    def pinned_config(self) -> dict[str, Any]:
        """Config values the method implies; a recipe that contradicts one is refused.

        SimPO is TRL's CPO trainer with the SimPO loss and no behaviour-cloning term, so it is a
        name for that combination rather than a trainer of its own.
        """
        if self is Method.SIMPO:
            return {"loss_type": "simpo", "cpo_alpha": 0.0}
        return {}

    @property
    def uses_reference_model(self) -> bool:
        """DPO and KTO compare against a frozen reference; ORPO/CPO/SimPO are reference-free."""
        return self in (Method.DPO, Method.KTO)


# method -> (config class, trainer class). ORPO and CPO live in trl.experimental in TRL 1.x.
_CLASSES: dict[Method, tuple[str, str]] = {
    Method.SFT: ("trl:SFTConfig", "trl:SFTTrainer"),
    Method.DPO: ("trl:DPOConfig", "trl:DPOTrainer"),
    Method.KTO: ("trl:KTOConfig", "trl:KTOTrainer"),
    Method.ORPO: ("trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo:ORPOTrainer"),
    Method.CPO: ("trl.experimental.cpo:CPOConfig", "trl.experimental.cpo:CPOTrainer"),
    Method.SIMPO: ("trl.experimental.cpo:CPOConfig", "trl.experimental.cpo:CPOTrainer"),
}


def import_object(path: str) -> Any:
    """Resolve "package.module:Name" to the object it names."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:Name'")
    with warnings.catch_warnings():
        # ORPO and CPO still live in trl.experimental; choosing them is the recipe's decision.
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        return getattr(importlib.import_module(module_name), attr)


def builtin_method_of(trainer_cls: type) -> Method:
    """The built-in method a custom trainer extends, found on its MRO.

    A custom trainer inherits its config class and data format from the TRL trainer it
    subclasses, so a recipe for it is validated against that trainer's config fields.
    """
    for method in (Method.DPO, Method.KTO, Method.SFT, Method.ORPO, Method.CPO):
        if issubclass(trainer_cls, import_object(method.trainer_class_path)):
            return method
    raise ValueError(
        f"{trainer_cls.__module__}.{trainer_cls.__name__} does not subclass a TRL trainer "
        f"({', '.join(p for _, p in _CLASSES.values())})"
    )


@dataclass(frozen=True)
class TrainerRule:
    """A combination of config values a TRL trainer refuses in its `__init__`, which runs only
    after the weights have loaded; mirrored here so that `--dry-run` refuses it first.

    `tests/test_train_recipes.py` builds the real trainer for every rule, so a rule TRL drops
    or changes fails a test instead of refusing good recipes.
    """

    methods: frozenset[Method]
    keys: str
    """The recipe keys involved, as the error names them."""
    refused: Callable[[Any], bool]
    """Given the built config object (defaults filled in): whether TRL would refuse it."""
    why: str


def _losses(config: Any) -> set[str]:
    value = config.loss_type
    return set(value) if isinstance(value, list) else {value}


# DPO's f-divergence generalisation exists only for these losses (trl DPOTrainer.__init__).
_F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair",
                                  "robust", "discopop", "sft"})
_DPO = frozenset({Method.DPO})
_KTO = frozenset({Method.KTO})

TRAINER_RULES: tuple[TrainerRule, ...] = (
    TrainerRule(_DPO, "f_divergence_type with loss_type",
                lambda c: c.f_divergence_type != "reverse_kl"
                and not _losses(c) <= _F_DIVERGENCE_LOSSES,
                "a non-default f_divergence_type works only with loss_type in "
                + ", ".join(sorted(_F_DIVERGENCE_LOSSES))),
    TrainerRule(_DPO, "use_weighting with loss_type",
                lambda c: c.use_weighting and bool(_losses(c) & {"aot", "aot_unpaired"}),
                "use_weighting is not implemented for the aot losses"),
    TrainerRule(_DPO, "label_smoothing with loss_type exo_pair",
                lambda c: "exo_pair" in _losses(c) and c.label_smoothing == 0.0,
                "exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)"),
    TrainerRule(_KTO, "train_sampling_strategy with loss_type",
                lambda c: c.loss_type != "apo_zero_unpaired"
                and c.train_sampling_strategy != "sequential",
                "the KTO loss pairs each example with its batch neighbours for the KL term: "
                "train_sampling_strategy must be 'sequential'"),
    TrainerRule(_KTO, "per_device_train_batch_size with loss_type",
                lambda c: c.loss_type != "apo_zero_unpaired" and c.per_device_train_batch_size <= 1,
                "the KTO loss estimates its KL term within a batch: per_device_train_batch_size "
                "must be at least 2"),
)
