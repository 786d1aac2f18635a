"""Recipes: YAML of plain TRL config keys plus a `stagesweep:` block, parsed and checked.

A recipe's top-level keys are fields of TRL's own dataclasses (the method's config, e.g.
`DPOConfig`, plus `ModelConfig`, `ScriptArguments` and `DatasetMixtureConfig`), so TRL's
documentation applies to recipes unchanged. Every key is checked against those fields before
anything heavy happens, so a typo costs a one-line error instead of a GPU hour.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stagesweep.cli import UserError, read_yaml_mapping
from stagesweep.train.methods import Method, builtin_method_of, import_object

# TRL dataclasses (besides the method's config) whose fields a recipe may set at top level.
SIDE_CLASSES = ("trl:ModelConfig", "trl:ScriptArguments", "trl:DatasetMixtureConfig")
TINY_PREFIX = "tiny:"
# Hub ids are `name` or `org/name`; anything else that is not an existing dir is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# A pin is a full commit sha: a branch or tag moves, and a short sha is not a revision the hub
# cache can key on.
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# `datasets` builders that read local files (`path: json` + data_files), not hub repositories.
_FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})


@dataclass
class StageSpec:
    """The `stagesweep:` block: what TRL does not know but the lineage needs."""

    stage: str
    """Name of this stage in the lineage (`sft`, `dpo`...); the output dir's node name."""
    method: Method
    trainer: str | None = None
    """For `method: custom`: "package.module:Class", a subclass of a TRL trainer."""
    merge_lora_on_export: bool = False
    """LoRA runs: write merged plain weights to output_dir (adapter kept in `adapter/`)."""
    chat_template: str | None = None
    """Named template for a parent without one (see stagesweep.chat_templates.FAMILIES)."""
    accelerate_config: str | None = None
    """The accelerate config the recipe was sized for (name in accelerate_configs/ or path)."""
    num_gpus: int = 1
    """Process count the recipe was sized for; with the batch keys it fixes the global batch."""
    global_batch_size: int | None = None
    """Pinned global batch: per_device_train_batch_size * gradient_accumulation_steps *
    num_gpus must equal it (checked), so a port to other hardware cannot change it silently."""
    dataset_revision: str | None = None
    """Commit sha of the hub dataset `dataset_name` (TRL's ScriptArguments has no such key)."""
    allow_unpinned: bool = False
    """Run even though a hub model or dataset has no commit sha: it then resolves to whatever
    the hub serves today (recorded in the manifest), so the run may not be reproducible."""


@dataclass
class Parent:
    """The model a stage starts from, as given and as the lineage records it."""

    spec: str
    """`model_name_or_path` as written (a path, a hub id, or `tiny:<arch>`)."""
    location: str
    """What `from_pretrained` receives; for `tiny:` names only known after building."""
    manifest: dict[str, Any]
    """{"path": ...} or {"hub_id": ..., "revision": ...}."""


@dataclass
class Recipe:
    """A validated recipe: the stage block, the keys per TRL dataclass, and provenance."""

    path: Path
    stagesweep: StageSpec
    trainer_path: str
    """Import path of the trainer class to run."""
    config_path: str
    """Import path of the TRL config class `training` is built into."""
    method_rules: Method
    """The built-in method whose data format and reference handling apply (for `custom`, the
    one its trainer subclasses)."""
    training: dict[str, Any]
    """Keys for the method's config class (TrainingArguments and its TRL subclass)."""
    model: dict[str, Any]
    """Keys for trl.ModelConfig (model_name_or_path, LoRA/quantisation)."""
    script: dict[str, Any]
    """Keys for trl.ScriptArguments (dataset_name, dataset_config, splits)."""
    mixture: dict[str, Any]
    """Keys for trl.DatasetMixtureConfig (`datasets:` list, local files resolved)."""
    resolved: dict[str, Any] = field(default_factory=dict)
    """The whole recipe after overrides, as recorded in the lineage manifest."""

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    @property
    def uses_peft(self) -> bool:
        return bool(self.model.get("use_peft"))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings to a dict; values are YAML so `bf16=false` is a bool.

    `stagesweep.KEY=VALUE` sets a key of the stagesweep block.
    """
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not KEY=VALUE (e.g. learning_rate=1e-5)")
        value = yaml.safe_load(text) if text else ""
        if key.startswith("stagesweep."):
            parsed.setdefault("stagesweep", {})[key.removeprefix("stagesweep.")] = value
        else:
            parsed[key] = value
    return parsed


def load_recipe(path: Path | str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every mistake is a one-line UserError."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe", "a recipe is a mapping of TRL config keys")
    block = raw.get("stagesweep")
    if not isinstance(block, dict):
        raise UserError(f"{path}: missing `stagesweep:` block (needs at least stage and method)")
    for key, value in parse_overrides(overrides or []).items():
        if key == "stagesweep":
            block.update(value)
        else:
            raw[key] = value
    if raw.get("hub_token"):
        # Into the environment, where huggingface_hub reads it: never pickled into the
        # checkpoints' training_args.bin nor recorded in the manifest.
        os.environ["HF_TOKEN"] = str(raw.pop("hub_token"))
    stage = _parse_stage(path, block)
    trainer_path, config_path, method = _classes_for(path, stage)

    targets = {"training": import_object(config_path)}
    for name, cls_path in zip(("model", "script", "mixture"), SIDE_CLASSES, strict=True):
        targets[name] = import_object(cls_path)
    hints = {name: typing.get_type_hints(cls) for name, cls in targets.items()}
    fields_of = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in targets.items()}
    valid = set().union(*fields_of.values())
    sorted_parts: dict[str, dict[str, Any]] = {name: {} for name in targets}
    for key, value in raw.items():
        if key == "stagesweep":
            continue
        if key not in valid:
            where = ", ".join(cls.__name__ for cls in targets.values())
            raise UserError(_unknown_key(path, key, valid, where))
        for name in targets:
            if key in fields_of[name]:
                sorted_parts[name][key] = _coerce(path, key, value, hints[name][key])

    for key, expected in method.pinned_config.items():
        given = sorted_parts["training"].get(key, expected)
        if given != expected:
            raise UserError(
                f"{path}: method {stage.method.value!r} means {key}={expected!r}, "
                f"but the recipe sets {key}={given!r}; use method cpo to choose another"
            )
        sorted_parts["training"][key] = expected
    training = sorted_parts["training"]
    _check_choices(path, targets["training"], training)
    training.setdefault("output_dir", str(Path("outputs") / path.parent.name / stage.stage))
    for entry in sorted_parts["mixture"].get("datasets") or []:
        _resolve_data_files(path, entry)
    template_file = training.get("chat_template_path")
    if template_file and (path.resolve().parent / template_file).is_file():
        # a template shipped beside the recipe (open-instruct's named templates as files)
        training["chat_template_path"] = str(path.resolve().parent / template_file)
    elif str(template_file or "").endswith((".jinja", ".j2")) and not Path(template_file).is_file():
        raise UserError(f"{path}: chat_template_path {template_file!r} not found next to the "
                        "recipe")
    if training.get("assistant_only_loss") and str(training.get("chat_template_path", "")
                                                   ).endswith((".jinja", ".j2")):
        check_assistant_masks(path, Path(training["chat_template_path"]).read_text())

    resolved = {k: v for k, v in raw.items() if k != "stagesweep"}
    resolved.update(training)
    resolved["stagesweep"] = {
        k: (v.value if isinstance(v, enum.Enum) else v)
        for k, v in dataclasses.asdict(stage).items()
    }
    if sorted_parts["mixture"].get("datasets"):
        resolved["datasets"] = sorted_parts["mixture"]["datasets"]
    recipe = Recipe(
        path=path,
        stagesweep=stage,
        trainer_path=trainer_path,
        config_path=config_path,
        method_rules=method,
        training=training,
        model=sorted_parts["model"],
        script=sorted_parts["script"],
        mixture=sorted_parts["mixture"],
        resolved=resolved,
    )
    _check_data_source(recipe)
    return recipe


def _parse_stage(path: Path, block: dict[str, Any]) -> StageSpec:
    hints = typing.get_type_hints(StageSpec)
    names = [f.name for f in dataclasses.fields(StageSpec)]
    for key in block:
        if key not in names:
            raise UserError(_unknown_key(path, f"stagesweep.{key}", set(names), "StageSpec"))
    for required in ("stage", "method"):
        if required not in block:
            raise UserError(f"{path}: `stagesweep.{required}` is required")
    values = {k: _coerce(path, f"stagesweep.{k}", v, hints[k]) for k, v in block.items()}
    return StageSpec(**values)


def _classes_for(path: Path, stage: StageSpec) -> tuple[str, str, Method]:
    """Trainer and config import paths, and the built-in method whose rules apply."""
    if stage.method is not Method.CUSTOM:
        if stage.trainer:
            raise UserError(
                f"{path}: `stagesweep.trainer` is only read with method: custom "
                f"(method is {stage.method.value!r})"
            )
        return stage.method.trainer_class_path, stage.method.config_class_path, stage.method
    if not stage.trainer:
        raise UserError(f"{path}: method: custom needs `stagesweep.trainer: package.module:Class`")
    if os.getcwd() not in sys.path:
        # Like `python -m`, a custom trainer module in the current directory is importable.
        sys.path.insert(0, os.getcwd())
    try:
        trainer_cls = import_object(stage.trainer)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"{path}: stagesweep.trainer {stage.trainer!r}: {err}") from None
    try:
        base = builtin_method_of(trainer_cls)
    except ValueError as err:
        raise UserError(f"{path}: stagesweep.trainer: {err}") from None
    # A trainer with hyperparameters of its own declares a config subclass that adds them.
    own = getattr(trainer_cls, "config_class", None)
    config_path = f"{own.__module__}:{own.__qualname__}" if own else base.config_class_path
    return stage.trainer, config_path, base


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def check_assistant_masks(where: Any, template: str) -> None:
    """`assistant_only_loss` needs the template to mark assistant turns with
    `{% generation %}`; TRL's SFT trainer refuses a template without them only once the weights
    are loaded."""
    if not _GENERATION_BLOCK.search(template):
        raise UserError(
            f"{where}: assistant_only_loss: true needs {{% generation %}} blocks around the "
            "assistant turns of the chat template, and this one has none; add them (the "
            "rendered text stays the same) or set assistant_only_loss: false"
        )


def _unknown_key(path: Path, key: str, valid: set[str], where: str) -> str:
    bare = key.removeprefix("stagesweep.")
    close = difflib.get_close_matches(bare, sorted(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; not a field of {where}"
    return f"{path}: unknown key {key!r}{hint}"


def _coerce(path: Path, key: str, value: Any, tp: Any) -> Any:
    """Check `value` against a dataclass field type, converting only what YAML gets wrong.

    PyYAML reads `3e-5` as a string (YAML 1.1 wants `3.0e-5`), so float fields take numeric
    strings; nothing else is converted.
    """
    try:
        return _convert(value, tp)
    except (TypeError, ValueError):
        raise UserError(
            f"{path}: key {key!r} expects {_type_name(tp)}, got {value!r}"
        ) from None


def _convert(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            # TRL and peft take a single item for list fields (loss_type: ipo), as do we.
            return _convert(value, item_tp)
        return [_convert(v, item_tp) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        return value
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int | float):
            return value
        if isinstance(value, str):
            return float(value)
        raise TypeError
    if tp is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    return value  # library types (ParallelismConfig...) are left to TRL to check


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _resolve_data_files(path: Path, entry: dict[str, Any]) -> None:
    """Local `data_files` are relative to the recipe, so a recipe runs from any directory."""
    files = entry.get("data_files")
    if files is None:
        return
    base = path.resolve().parent

    def fix(item: str) -> str:
        candidate = base / item
        if not candidate.exists() and not Path(item).exists():
            raise UserError(f"{path}: datasets data_files {item!r} not found next to the recipe")
        return str(candidate if candidate.exists() else Path(item).resolve())

    if isinstance(files, str):
        entry["data_files"] = fix(files)
    elif isinstance(files, list):
        entry["data_files"] = [fix(f) for f in files]
    elif isinstance(files, dict):
        entry["data_files"] = {
            split: ([fix(f) for f in f_list] if isinstance(f_list, list) else fix(f_list))
            for split, f_list in files.items()
        }


def _check_data_source(recipe: Recipe) -> None:
    if not recipe.script.get("dataset_name") and not recipe.mixture.get("datasets"):
        raise UserError(
            f"{recipe.path}: no training data: set `dataset_name` (a hub id) or `datasets:` "
            "(a list of {path, data_files, split} as in trl's DatasetMixtureConfig)"
        )
    for i, entry in enumerate(recipe.mixture.get("datasets") or []):
        if not isinstance(entry, dict) or "path" not in entry:
            raise UserError(f"{recipe.path}: datasets[{i}] needs a `path` (e.g. json or a hub id)")


def resolve_parent(recipe: Recipe, *, build: bool) -> Parent:
    """Where the stage starts: an existing dir, a hub id, or a tiny model built on demand.

    With `build=False` (dry runs) nothing is built or downloaded; a hub id is accepted as
    written, since checking it would need the network.
    """
    spec = recipe.model.get("model_name_or_path")
    if not spec:
        raise UserError(f"{recipe.path}: `model_name_or_path` (the parent checkpoint) is required")
    if spec.startswith(TINY_PREFIX):
        from stagesweep.tiny_model import ARCHS, ensure_tiny_model

        arch = spec.removeprefix(TINY_PREFIX)
        if arch not in ARCHS:
            raise UserError(
                f"{recipe.path}: model_name_or_path {spec!r}: unknown tiny arch; "
                f"choose one of {', '.join(TINY_PREFIX + a for a in ARCHS)}"
            )
        location = str(ensure_tiny_model(arch)) if build else spec
        return Parent(spec, location, {"path": location, "tiny": arch})
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise UserError(
                f"{recipe.path}: model_name_or_path {spec!r} is a directory without config.json"
            )
        resolved = str(local.resolve())
        return Parent(spec, resolved, {"path": resolved})
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        revision = recipe.model.get("model_revision", "main")
        return Parent(spec, spec, {"hub_id": spec, "revision": revision})
    raise UserError(
        f"{recipe.path}: model_name_or_path {spec!r}: no such directory "
        "(hub ids are written org/name)"
    )


@dataclass
class HubPin:
    """One hub repository a recipe downloads, and the commit it is pinned to."""

    key: str
    """The recipe key that names it (`model_name_or_path`, `dataset_name`, `datasets[0]`)."""
    hub_id: str
    revision: str | None
    """As written: a commit sha, a branch or tag, or None."""
    revision_key: str | None
    """Where its revision is set; None where the recipe has no way to pin it."""

    @property
    def pinned(self) -> bool:
        return self.revision is not None and _COMMIT_SHA.match(self.revision) is not None

    def describe(self) -> str:
        if self.pinned:
            return f"{self.key}: {self.hub_id} @ {self.revision}"
        where = f"set {self.revision_key} to a commit sha" if self.revision_key else (
            "hub entries of `datasets:` cannot be pinned; use dataset_name and "
            "stagesweep.dataset_revision")
        return f"{self.key}: {self.hub_id} @ {self.revision or 'main'} (UNPINNED: {where})"


def hub_pins(recipe: Recipe) -> list[HubPin]:
    """Every hub model and dataset the recipe would download, with its revision."""
    pins = []
    parent = recipe.model.get("model_name_or_path") or ""
    if _is_hub_id(parent):
        pins.append(HubPin("model_name_or_path", parent, recipe.model.get("model_revision"),
                           "model_revision"))
    dataset = recipe.script.get("dataset_name")
    if dataset and _is_hub_id(dataset):
        pins.append(HubPin("dataset_name", dataset, recipe.stagesweep.dataset_revision,
                           "stagesweep.dataset_revision"))
    for i, entry in enumerate(recipe.mixture.get("datasets") or []):
        path = str(entry.get("path", ""))
        if path not in _FILE_BUILDERS and _is_hub_id(path):
            pins.append(HubPin(f"datasets[{i}]", path, None, None))
    return pins


def check_pins(recipe: Recipe) -> list[HubPin]:
    """Refuse hub ids without a commit sha unless `stagesweep.allow_unpinned` says otherwise.

    A hub repository's `main` moves (OLMo-2-1124-7B was re-released after a tokenizer fix), so
    an unpinned recipe names different weights or data on different days.
    """
    pins = hub_pins(recipe)
    loose = [pin for pin in pins if not pin.pinned]
    if loose and not recipe.stagesweep.allow_unpinned:
        raise UserError(
            f"{recipe.path}: unpinned hub ids: "
            + "; ".join(f"{p.hub_id} ({p.revision_key or p.key})" for p in loose)
            + ": set 40-hex commit shas, or stagesweep.allow_unpinned=true to train on "
            "whatever the hub serves today"
        )
    return pins


def _is_hub_id(spec: str) -> bool:
    if not spec or spec.startswith((TINY_PREFIX, ".", "~", "/")):
        return False
    return not Path(spec).expanduser().exists() and _HUB_ID.match(spec) is not None


def documented_choices(config_cls: type) -> dict[str, tuple[str, ...]]:
    """Fields whose TRL docstring lists "Possible values", with those values.

    TRL types some of these as plain `str`/`list[str]` and checks them only inside the loss
    (DPO's `loss_type` fails at the first training step, after the weights loaded), so the
    values are read from the installed TRL's own documentation and checked before that.
    """
    found: dict[str, tuple[str, ...]] = {}
    for cls in reversed(config_cls.__mro__):
        doc = cls.__dict__.get("__doc__") or ""
        for match in _DOC_PARAM.finditer(doc):
            name, body = match.group(1), match.group(2)
            _, sep, rest = body.partition("Possible values are")
            if not sep:
                continue
            bullets = re.findall(r"^\s*- `[\"']?([\w.-]+)[\"']?`", rest, flags=re.MULTILINE)
            if not bullets:
                inline = re.split(r"\.\s", rest, maxsplit=1)[0]
                bullets = re.findall(r"`[\"']?([\w.-]+)[\"']?`", inline)
            if bullets:
                found[name] = tuple(bullets)
    return found


# One parameter entry of a Google-style docstring: `name (type...):` and its indented body.
_DOC_PARAM = re.compile(r"^\s{4,}(\w+) \([^\n]*\):\n(.*?)(?=^\s{4,}\w+ \(|^\s{4,}> |\Z)",
                        re.MULTILINE | re.DOTALL)


def _check_choices(path: Path, config_cls: type, training: dict[str, Any]) -> None:
    for key, choices in documented_choices(config_cls).items():
        if key not in training or training[key] is None:
            continue
        values = training[key] if isinstance(training[key], list) else [training[key]]
        for value in values:
            if value not in choices:
                raise UserError(
                    f"{path}: {key} {value!r} is not a {config_cls.__name__} {key}; valid "
                    f"values: {', '.join(choices)}"
                )


@dataclass
class AccelerateSetup:
    """What the combination checks need to know of an accelerate config file."""

    path: Path
    distributed_type: str
    zero_stage: int | None
    num_processes: int


def accelerate_config_path(name: str) -> Path:
    """NAME -> accelerate_configs/NAME.yaml in the repository; anything else is a path."""
    from stagesweep.tiny_model import REPO_ROOT

    named = REPO_ROOT / "accelerate_configs" / f"{name}.yaml"
    if named.exists():
        return named
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    known = sorted(p.stem for p in (REPO_ROOT / "accelerate_configs").glob("*.yaml"))
    raise UserError(
        f"accelerate config {name!r} not found; use a path or one of {', '.join(known) or '(none)'}"
    )


ACCELERATE_CONFIG_HINT = "an accelerate config is a mapping (see `accelerate config`)"


def read_accelerate_config(name: str) -> AccelerateSetup:
    path = accelerate_config_path(name)
    data = read_yaml_mapping(path, "accelerate config", ACCELERATE_CONFIG_HINT)
    distributed_type = str(data.get("distributed_type", "NO")).upper()
    zero_stage = None
    if distributed_type == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        zero_stage = ds.get("zero_stage")
        if ds.get("deepspeed_config_file"):
            ds_file = path.parent / ds["deepspeed_config_file"]
            try:
                ds_json = json.loads(ds_file.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"{path}: deepspeed_config_file {ds_file}: {err}") from None
            zero_stage = (ds_json.get("zero_optimization") or {}).get("stage", zero_stage)
    return AccelerateSetup(
        path=path,
        distributed_type=distributed_type,
        zero_stage=zero_stage,
        num_processes=int(data.get("num_processes", 1)),
    )


def check_combinations(recipe: Recipe, accelerate: AccelerateSetup | None) -> None:
    """Refuse settings that cannot work together, before any weights are loaded."""
    where, model, training = recipe.path, recipe.model, recipe.training
    stage = recipe.stagesweep
    quantized = model.get("load_in_4bit") or model.get("load_in_8bit")
    if quantized and not model.get("use_peft"):
        raise UserError(
            f"{where}: load_in_4bit/load_in_8bit trains only adapters: set use_peft: true"
        )
    if model.get("load_in_4bit") and model.get("load_in_8bit"):
        raise UserError(f"{where}: set one of load_in_4bit and load_in_8bit, not both")
    if stage.merge_lora_on_export and not model.get("use_peft"):
        raise UserError(f"{where}: stagesweep.merge_lora_on_export needs use_peft: true")
    if stage.chat_template is not None:
        from stagesweep.chat_templates import FAMILIES

        if family_name(stage.chat_template) not in FAMILIES:
            raise UserError(
                f"{where}: stagesweep.chat_template {stage.chat_template!r} is unknown; "
                f"choose one of {', '.join(FAMILIES)}"
            )
    if stage.global_batch_size is not None:
        per_device = training.get("per_device_train_batch_size", 8)
        accum = training.get("gradient_accumulation_steps", 1)
        actual = per_device * accum * stage.num_gpus
        if actual != stage.global_batch_size:
            raise UserError(
                f"{where}: per_device_train_batch_size ({per_device}) x "
                f"gradient_accumulation_steps ({accum}) x stagesweep.num_gpus ({stage.num_gpus}) "
                f"= {actual}, not stagesweep.global_batch_size ({stage.global_batch_size})"
            )
    if training.get("use_cpu") and (training.get("bf16") or training.get("fp16")):
        # TrainingArguments accepts bf16 on some CPUs, but the tiny path must stay portable.
        raise UserError(f"{where}: use_cpu: true with bf16/fp16: set bf16: false")
    if accelerate is None:
        return
    sharded = accelerate.zero_stage == 3 or accelerate.distributed_type == "FSDP"
    if sharded and model.get("load_in_8bit"):
        raise UserError(
            f"{where}: load_in_8bit cannot be sharded by ZeRO-3/FSDP "
            f"({accelerate.path.name}); use load_in_4bit with bnb_4bit_quant_storage"
        )
    if sharded and model.get("load_in_4bit") and not model.get("bnb_4bit_quant_storage"):
        raise UserError(
            f"{where}: QLoRA under ZeRO-3/FSDP ({accelerate.path.name}) needs "
            "bnb_4bit_quant_storage (e.g. bfloat16) so the sharded weights share one dtype"
        )


def family_name(name: str) -> str:
    """Accept tiny-model arch names (`llama`, `gpt-oss`) for their chat family."""
    from stagesweep.tiny_model import ARCHS

    return ARCHS[name].family if name in ARCHS else name
