"""Run one recipe: load the parent, fix its chat template and pad token, train with TRL, save.

One function per entry point (TRL-script style): `train()` validates, relaunches under
accelerate when asked, resumes from the last checkpoint of an existing output dir, and leaves
a lineage manifest in the output dir and in every intermediate checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stagesweep.cli import UserError
from stagesweep.lineage import MANIFEST_NAME, write_manifest
from stagesweep.train.recipe import (
    Parent,
    Recipe,
    check_assistant_masks,
    check_combinations,
    check_pins,
    family_name,
    hub_pins,
    load_recipe,
    read_accelerate_config,
    resolve_parent,
)

logger = logging.getLogger(__name__)

# Set by the accelerate relaunch (stagesweep.train.launch) for the workers it starts.
ACCELERATE_ENV = "STAGESWEEP_ACCELERATE_CONFIG"
ADAPTER_SUBDIR = "adapter"
_VERSIONED = ("stagesweep", "torch", "transformers", "trl", "peft", "datasets", "accelerate",
              "deepspeed")


def train(
    recipe: Path | str,
    overrides: list[str],
    *,
    accelerate_config: str | None = None,
    dry_run: bool = False,
) -> Path:
    """Train `recipe` (with `KEY=VALUE` overrides) and return the output dir.

    With `accelerate_config` outside a launched worker, the run is re-executed under
    `accelerate launch` with that config's process count. With `dry_run`, only the offline
    checks of `validate()` run.
    """
    if dry_run:
        return validate(recipe, overrides, accelerate_config=accelerate_config).output_dir
    spec = load_recipe(recipe, overrides)
    config_name = accelerate_config or os.environ.get(ACCELERATE_ENV)
    check_combinations(spec, read_accelerate_config(config_name) if config_name else None)
    check_pins(spec)  # before any download: an unpinned id is refused, not fetched
    from stagesweep.train.launch import relaunch, running_under_launcher

    if accelerate_config and not running_under_launcher():
        argv = [str(recipe), *overrides]
        code = relaunch(accelerate_config, argv)
        if code != 0:
            raise UserError(f"training under accelerate config {accelerate_config!r} "
                            f"failed (exit {code}); see the log above")
        return spec.output_dir
    return _run(spec, resolve_parent(spec, build=True))


def validate(recipe: Path | str, overrides: list[str], *,
             accelerate_config: str | None = None) -> Recipe:
    """Every offline check of a run, without loading weights or data: keys, types, documented
    values, combinations, the parent, hub pins and the TRL configs' own validation.

    Checked against the given accelerate config, or else the one the recipe was sized for,
    since that is where it will eventually run.
    """
    spec = load_recipe(recipe, overrides)
    config_name = (accelerate_config or os.environ.get(ACCELERATE_ENV)
                   or spec.stagesweep.accelerate_config)
    check_combinations(spec, read_accelerate_config(config_name) if config_name else None)
    resolve_parent(spec, build=False)
    _check_side_configs(spec)
    _check_trainer_rules(spec, _build_config(spec, for_validation=True))
    check_pins(spec)
    return spec


def _check_trainer_rules(spec: Recipe, config: Any) -> None:
    from stagesweep.train.methods import TRAINER_RULES

    for rule in TRAINER_RULES:
        if spec.method_rules in rule.methods and rule.refused(config):
            raise UserError(f"{spec.path}: {rule.keys}: {rule.why} "
                            f"(TRL's trainer would refuse it after loading the weights)")


def _check_side_configs(spec: Recipe) -> None:
    """Run the own checks of TRL's model, script and data-mixture dataclasses on the recipe."""
    from stagesweep.train.methods import import_object
    from stagesweep.train.recipe import SIDE_CLASSES

    for cls_path, values in zip(SIDE_CLASSES, (spec.model, spec.script, spec.mixture),
                                strict=True):
        cls = import_object(cls_path)
        try:
            cls(**copy.deepcopy(values))
        except (ValueError, TypeError) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise UserError(f"{spec.path}: {cls.__name__} refused the recipe: {message}") from None


def _build_config(spec: Recipe, *, for_validation: bool = False) -> Any:
    """The method's TRL config object; its own __post_init__ checks run here.

    For validation on a machine without the recipe's GPUs, precision and distributed keys are
    left out: they are checked against the hardware when the real run starts.
    """
    from stagesweep.train.methods import import_object

    config_cls = import_object(spec.config_path)
    values = dict(spec.training)
    values.setdefault("run_name", spec.stagesweep.stage)
    if for_validation:
        for key in ("bf16", "fp16", "tf32", "deepspeed", "fsdp", "fsdp_config"):
            values.pop(key, None)
        values["use_cpu"] = True
        values["report_to"] = "none"
    else:
        from stagesweep.train.launch import prepare_worker

        values = prepare_worker(values)
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise UserError(
            f"{spec.path}: {config_cls.__name__} refused the recipe: {message}"
        ) from None


def _run(spec: Recipe, parent: Parent) -> Path:
    report_to = spec.training.get("report_to")
    if report_to == "wandb" or (isinstance(report_to, list) and "wandb" in report_to):
        with _wandb_environment(spec.output_dir):
            return _train_stage(spec, parent)
    return _train_stage(spec, parent)


def _train_stage(spec: Recipe, parent: Parent) -> Path:
    from stagesweep.train.callbacks import ManifestCallback
    from stagesweep.train.methods import import_object

    output_dir = spec.output_dir
    args = _build_config(spec)
    _check_trainer_rules(spec, args)
    train_data, eval_data = _load_data(spec, args)  # first: a wrong column fails before weights
    model, tokenizer, load_kwargs = _load_parent(spec, parent)

    extra: dict[str, Any] = {}
    if (spec.method_rules.uses_reference_model and not spec.uses_peft
            and not getattr(args, "precompute_ref_log_probs", False)):
        # Loaded here rather than by the trainer, which would reload the parent's path without
        # its revision, and without the embedding rows a new pad token added.
        reference = _from_pretrained(spec, parent, load_kwargs)
        if reference.get_input_embeddings().num_embeddings < len(tokenizer):
            reference.resize_token_embeddings(len(tokenizer))
        extra["ref_model"] = reference
    peft_config = None
    if spec.uses_peft:
        from trl import ModelConfig, get_peft_config

        peft_config = get_peft_config(ModelConfig(**spec.model))

    base_manifest = _manifest(spec, parent, train_data, args)
    pinned = spec.stagesweep.global_batch_size
    if pinned and base_manifest["global_batch_size"] != pinned:
        logger.warning(
            "global batch is %d here (%d processes), not the recipe's pinned %d: results are "
            "not comparable with runs at the pinned size; adjust gradient_accumulation_steps",
            base_manifest["global_batch_size"], args.world_size, pinned,
        )
    callback = ManifestCallback(base_manifest)
    trainer_cls = import_object(spec.trainer_path)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
        **extra,
    )
    if spec.method_rules.uses_reference_model:
        callback.base["reference"] = _reference_kind(trainer, args)
    resume = spec.training.get("resume_from_checkpoint")
    if resume is None and output_dir.is_dir():
        resume = last_complete_checkpoint(output_dir)
    if resume:
        logger.warning("resuming %s from %s", spec.stagesweep.stage, resume)
    callback.base["resumed_from"] = str(resume) if resume else None
    trainer.train(resume_from_checkpoint=resume)

    final = dict(callback.base, global_step=trainer.state.global_step,
                 world_size=args.world_size)
    if spec.uses_peft and spec.stagesweep.merge_lora_on_export:
        adapter_dir = output_dir / ADAPTER_SUBDIR
        trainer.save_model(str(adapter_dir))
        if trainer.is_world_process_zero():
            _export_merged(spec, parent, adapter_dir, tokenizer, model.generation_config)
        final["adapter"] = {"path": str(adapter_dir.resolve()), "merged": True}
    else:
        trainer.save_model(str(output_dir))
        if spec.uses_peft:
            final["adapter"] = {"path": str(output_dir.resolve()), "merged": False}
    if spec.uses_peft:
        final["base"] = parent.manifest
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        model.generation_config.save_pretrained(str(output_dir))
        write_manifest(output_dir, final)
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        # The wandb callback leaves its run open; a second train() in this process would
        # otherwise log into the first one's run. Teardown waits for wandb's writer process,
        # so the run's files are complete when train() returns.
        wandb.finish()
        wandb.teardown()
    if hasattr(trainer, "end"):  # transformers >= 5.18 finishes trackers and process groups
        trainer.end()
    return output_dir


def _reference_kind(trainer: Any, args: Any) -> str:
    """How the trainer gets reference log-probs; recorded because it changes memory and speed."""
    if getattr(args, "precompute_ref_log_probs", False):
        return "precomputed"
    if getattr(trainer, "ref_model", None) is None:
        return "adapter_disabled"  # LoRA: the policy with its adapters switched off
    return "frozen_copy"


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The newest `checkpoint-N` that was completely written, to resume from.

    A run killed while saving leaves a partial newest checkpoint, which transformers'
    get_last_checkpoint would pick and then fail to load. The manifest is written after the
    checkpoint (trainer_state.json last among the trainer's files, for runs without one).
    """
    steps = []
    for child in output_dir.glob("checkpoint-*"):
        suffix = child.name.removeprefix("checkpoint-")
        if child.is_dir() and suffix.isdigit():
            steps.append((int(suffix), child))
    for _, child in sorted(steps, reverse=True):
        if (child / MANIFEST_NAME).is_file() or (
            not any((c / MANIFEST_NAME).is_file() for _, c in steps)
            and (child / "trainer_state.json").is_file()
        ):
            return str(child)
        logger.warning("skipping %s: it was not completely written", child)
    return None


@contextlib.contextmanager
def _wandb_environment(output_dir: Path) -> Iterator[None]:
    """wandb logs locally (synced later with `wandb sync`) unless the user can log in.

    The variables set here are removed afterwards, so the next stage trained in the same
    process gets its own defaults (its own WANDB_DIR).
    """
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    defaults = {
        "WANDB_PROJECT": "stagesweep",
        # Runs land next to the checkpoints they describe instead of in the current dir.
        "WANDB_DIR": str(output_dir.resolve()),
    }
    if not os.environ.get("WANDB_API_KEY") and not logged_in:
        defaults["WANDB_MODE"] = "offline"
    added = [key for key in defaults if key not in os.environ]
    for key in added:
        os.environ[key] = defaults[key]
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if (wandb := sys.modules.get("wandb")) is not None:
        # wandb's process-wide singleton keeps the settings (WANDB_DIR, mode) of the first run
        # in this process; without a teardown this stage's run would land in that run's dir.
        wandb.teardown()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _load_parent(spec: Recipe, parent: Parent) -> tuple[Any, Any, dict[str, Any]]:
    """Model and tokenizer of the parent, with a chat template, a distinct pad and stop ids."""
    from transformers import AutoTokenizer
    from trl import ModelConfig, get_quantization_config

    model_args = ModelConfig(**spec.model)
    revision = spec.model.get("model_revision", "main") if "hub_id" in parent.manifest else None
    trust = bool(spec.training.get("trust_remote_code"))
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust}
    if model_args.dtype:
        kwargs["dtype"] = model_args.dtype
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        from accelerate import PartialState

        # bitsandbytes weights are placed at load time: each process on its own device.
        kwargs["device_map"] = {"": PartialState().local_process_index}
    kwargs.update(spec.training.get("model_init_kwargs") or {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent.location, revision=revision,
                                                  trust_remote_code=trust)
    except OSError as err:
        raise UserError(f"{spec.path}: cannot load parent {parent.spec!r}: "
                        f"{str(err).splitlines()[0]}") from None
    template_file = str(spec.training.get("chat_template_path") or "")
    if template_file.endswith((".jinja", ".j2")):
        # TRL's SFT trainer installs it too, but only after the checks below need a template
        tokenizer.chat_template = Path(template_file).read_text(encoding="utf-8")
    template_name = spec.stagesweep.chat_template
    cloned = template_file and not template_file.endswith((".jinja", ".j2"))
    if spec.training.get("assistant_only_loss") and not cloned:
        from stagesweep.chat_templates import FAMILIES

        named = FAMILIES[family_name(template_name)].template if template_name else None
        effective = tokenizer.chat_template or named
        if effective:  # before the weights load: TRL would refuse it after
            check_assistant_masks(f"{spec.path}: parent {parent.spec!r}", effective)
    model = _from_pretrained(spec, parent, kwargs)
    if "hub_id" in parent.manifest:
        # the commit the hub actually served: the record of an unpinned run
        parent.manifest["resolved_revision"] = getattr(model.config, "_commit_hash", None)
    prepare_chat(tokenizer, model, spec.stagesweep.chat_template, where=spec.path)
    return model, tokenizer, kwargs


def _from_pretrained(spec: Recipe, parent: Parent, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(parent.location, **kwargs)
    except OSError as err:
        raise UserError(f"{spec.path}: cannot load parent {parent.spec!r}: "
                        f"{str(err).splitlines()[0]}") from None


def prepare_chat(tokenizer: Any, model: Any, template_name: str | None, *, where: Any) -> None:
    """Keep the parent's chat template (or install a named one), separate pad from EOS, and
    make the saved generation config stop on the template's end-of-turn token.

    These are the three things that silently break a fine-tune: a base model without a
    template, pad == eos (the trainers then mask every EOS out of the loss, so the model never
    learns to stop), and a generation config that stops only on the document end token.
    """
    from stagesweep.chat_templates import FAMILIES

    family = None
    if tokenizer.chat_template is None:
        if template_name is None:
            raise UserError(
                f"{where}: the parent has no chat template; set stagesweep.chat_template to "
                f"one of {', '.join(FAMILIES)}"
            )
        family = FAMILIES[family_name(template_name)]
        vocab = tokenizer.get_vocab()
        missing = [t for t in family.special_tokens if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        tokenizer.chat_template = family.template
    end_of_turn = family.end_of_turn if family else end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if tokenizer.pad_token is None or tokenizer.pad_token_id in (eot_id, tokenizer.eos_token_id):
        pad = family.pad if family and family.pad != end_of_turn else "<|pad|>"
        tokenizer.add_special_tokens({"pad_token": pad})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    existing = model.generation_config.eos_token_id
    existing = existing if isinstance(existing, list) else [existing]
    stops = [eot_id, *existing, tokenizer.eos_token_id]
    model.generation_config.eos_token_id = list(dict.fromkeys(s for s in stops if s is not None))
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def end_of_turn_token(tokenizer: Any) -> str:
    """The special token the chat template puts right after an assistant answer.

    Found by rendering a one-turn chat, so it works for any family's template; falls back to
    the tokenizer's eos when the template closes turns with plain text.
    """
    marker = "stagesweep-answer"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    tail = text[text.rindex(marker) + len(marker):]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return tokenizer.eos_token


def _load_data(spec: Recipe, args: Any) -> tuple[Any, Any]:
    from datasets import load_dataset
    from trl import DatasetMixtureConfig, get_dataset

    from stagesweep.train.methods import DataFormat

    script = spec.script
    if spec.mixture.get("datasets"):
        # DatasetMixtureConfig turns the entries into objects in place; keep the recipe's dicts.
        data = get_dataset(DatasetMixtureConfig(**copy.deepcopy(spec.mixture)))
    else:
        data = load_dataset(script["dataset_name"], name=script.get("dataset_config"),
                            revision=spec.stagesweep.dataset_revision,
                            streaming=bool(script.get("dataset_streaming")))
    train_split = script.get("dataset_train_split", "train")
    test_split = script.get("dataset_test_split", "test")
    if train_split not in data:
        raise UserError(f"{spec.path}: dataset has no split {train_split!r} "
                        f"(has {', '.join(data)}); set dataset_train_split")
    data_format = spec.method_rules.data_format
    columns = list(data[train_split].column_names or [])
    if columns and not data_format.accepts(columns):
        wanted = " or ".join("/".join(sorted(c)) for c in data_format.column_sets)
        raise UserError(
            f"{spec.path}: method {spec.stagesweep.method.value!r} trains on {wanted} columns; "
            f"the dataset's {train_split!r} split has {', '.join(columns)}"
        )
    evaluating = str(getattr(args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO")
    eval_data = data[test_split] if evaluating and test_split in data else None
    if data_format is not DataFormat.LANGUAGE_MODELING:
        return conversational_pairs(data[train_split]), (
            conversational_pairs(eval_data) if eval_data is not None else None)
    return data[train_split], eval_data


def conversational_pairs(data: Any) -> Any:
    """Give a preference table one format: a plain-text `prompt` beside conversational
    `chosen`/`rejected` becomes conversational too.

    TRL decides "conversational" from whichever of those keys it happens to inspect first
    (`is_conversational` pops from a set), so a table like OLMo 2's preference mixes (a string
    `prompt` next to message lists that already start with that prompt's user turn) would be
    trained with or without the chat template depending on the process. Where the message lists
    hold the whole conversation the string is a copy and is dropped (TRL then takes the shared
    leading turns as the prompt); where they hold only the answer it becomes a user turn.
    """
    columns = list(data.column_names or [])
    if "prompt" not in columns or "chosen" not in columns:
        return data
    first = next(iter(data))
    chosen = first["chosen"]
    if not isinstance(first["prompt"], str) or not _is_messages(chosen):
        return data
    if chosen[0].get("role") != "assistant":
        return data.remove_columns("prompt")
    return data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and "role" in value[0])


def _manifest(spec: Recipe, parent: Parent, train_data: Any, args: Any) -> dict[str, Any]:
    per_device = args.per_device_train_batch_size
    return {
        "stage": spec.stagesweep.stage,
        "method": spec.stagesweep.method.value,
        "trainer": spec.trainer_path,
        "parent": parent.manifest,
        # every hub repository downloaded, as pinned (or "main" where the recipe allowed that)
        "hub_revisions": {pin.hub_id: pin.revision or "main" for pin in hub_pins(spec)},
        "recipe": spec.resolved,
        "recipe_path": str(spec.path.resolve()),
        # datasets' content hash of the loaded split (changes with files, revision and split)
        "data_fingerprint": getattr(train_data, "_fingerprint", None),
        "num_examples": len(train_data) if hasattr(train_data, "__len__") else None,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "global_step": 0,
        "world_size": args.world_size,
        "global_batch_size": per_device * args.gradient_accumulation_steps * args.world_size,
        "accelerate_config": os.environ.get(ACCELERATE_ENV),
        "wandb_run_id": None,
    }


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _git_commit() -> str | None:
    from stagesweep.tiny_model import REPO_ROOT

    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _export_merged(spec: Recipe, parent: Parent, adapter_dir: Path, tokenizer: Any,
                   generation_config: Any) -> None:
    """Merge the adapter into full-precision parent weights; the evaluator loads plain weights.

    The parent is reloaded unquantized on CPU rather than merging the training copy, which may
    be 4-bit or sharded across processes.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = spec.model.get("dtype") or "auto"
    base = AutoModelForCausalLM.from_pretrained(parent.location, dtype=dtype)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.generation_config = generation_config
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(spec.output_dir))
    tokenizer.save_pretrained(str(spec.output_dir))
