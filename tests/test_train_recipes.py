"""Recipe validation: every shipped recipe dry-runs offline; mistakes are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stagesweep.cli import UserError

REPO = Path(__file__).resolve().parent.parent
TRAINING_RECIPES = sorted(
    p for p in (REPO / "recipes").glob("*/*.yaml") if p.parent.name != "sweeps"
)
TINY_DPO = REPO / "recipes" / "tiny" / "dpo.yaml"


def _dry_run(recipe: Path, overrides: list[str] | None = None, **kwargs) -> Path:
    from stagesweep.train.run import train

    return train(recipe, overrides or [], dry_run=True, **kwargs)


def _variant(tmp_path: Path, edit) -> Path:
    """A copy of the tiny DPO recipe changed by `edit(dict)`, its data path made absolute."""
    data = yaml.safe_load(TINY_DPO.read_text())
    data["datasets"][0]["data_files"] = str(TINY_DPO.parent / "data" / "preference.jsonl")
    edit(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _as_sft(data: dict, **keys) -> None:
    """Turn the tiny DPO recipe into an SFT one (keys only; dry runs read no data)."""
    for key in ("loss_type", "beta"):
        data.pop(key)
    data["stagesweep"]["method"] = "sft"
    data.update(keys)


def test_real_and_tiny_recipes_are_shipped():
    names = {f"{p.parent.name}/{p.stem}" for p in TRAINING_RECIPES}
    expected = {f"olmo2-1b/{m}" for m in ("sft", "dpo", "ipo", "simpo", "kto", "orpo")}
    expected |= {"olmo3-7b/sft", "olmo3-7b/dpo", "olmo3-7b/dpo_lora"}
    expected |= {f"tiny/{m}" for m in ("sft", "dpo", "ipo", "kto", "orpo", "cpo", "simpo")}
    assert expected <= names


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_passes_dry_run(recipe: Path, monkeypatch):
    from stagesweep.train.recipe import load_recipe

    # Offline: a hub id parent must be accepted without asking the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Hub ids without a verified commit sha are refused unless allowed (test_unpinned_...).
    assert _dry_run(recipe, ["stagesweep.allow_unpinned=true"]).name
    spec = load_recipe(recipe)
    block = spec.stagesweep
    # the global batch is pinned and the hardware named
    assert block.global_batch_size and block.num_gpus >= 1
    if spec.model["model_name_or_path"].startswith("allenai/"):
        if recipe.parent.name == "olmo3-7b" and block.method.value == "sft":
            # OLMo-core's batch is in tokens: 1,048,576 per step (7b_instruct_sft.sh)
            assert block.global_batch_size * spec.training["max_length"] == 1_048_576
        else:  # the published runs' 128 sequences or pairs per step
            assert block.global_batch_size == 128
        assert spec.training["report_to"] == "wandb"


def test_misspelt_key_is_refused_by_file_key_and_suggestion(tmp_path: Path):
    recipe = _variant(tmp_path, lambda d: d.update(learning_rat=d.pop("learning_rate")))
    with pytest.raises(UserError) as err:
        _dry_run(recipe)
    assert str(recipe) in str(err.value)
    assert "'learning_rat'" in str(err.value) and "did you mean 'learning_rate'" in str(err.value)


def test_misspelt_key_through_the_command_line(tmp_path: Path, capsys):
    from stagesweep.cli import main

    recipe = _variant(tmp_path, lambda d: d.update(learning_rat=d.pop("learning_rate")))
    assert main(["train", str(recipe), "--dry-run"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("stagesweep train: error: ")
    assert str(recipe) in line and "learning_rat" in line and "learning_rate" in line


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["stagesweep"].update(stagee="x"), "unknown key 'stagesweep.stagee'; did you "
         "mean 'stage'"),
        (lambda d: d.update(beta="strong"), "key 'beta' expects float, got 'strong'"),
        (lambda d: d.update(max_steps=2.5), "key 'max_steps' expects int"),
        (lambda d: d.update(lr_scheduler_type="sideways"), "DPOConfig refused the recipe"),
        (lambda d: d["stagesweep"].update(method="ppo"), "key 'stagesweep.method' expects one of"),
        (lambda d: d["stagesweep"].pop("stage"), "`stagesweep.stage` is required"),
        (lambda d: d.update(load_in_4bit=True), "set use_peft: true"),
        (lambda d: d["stagesweep"].update(merge_lora_on_export=True), "needs use_peft: true"),
        (lambda d: d.update(gradient_accumulation_steps=3), "= 12, not stagesweep.global_batch"),
        (lambda d: d.update(model_name_or_path="/nonexistent/sft"), "no such directory"),
        (lambda d: d.update(model_name_or_path="tiny:mamba"), "unknown tiny arch"),
        (lambda d: d["stagesweep"].update(chat_template="vicuna"), "chat_template 'vicuna' is "
         "unknown"),
        (lambda d: d.update(bf16=True), "use_cpu: true with bf16/fp16"),
        (lambda d: d.pop("datasets"), "no training data"),
        (lambda d: d["datasets"][0].update(colums=["x"]), "DatasetMixtureConfig refused"),
        (lambda d: d["stagesweep"].update(trainer="x:Y"), "only read with method: custom"),
        (lambda d: d.update(loss_type="sigmoidd"), "loss_type 'sigmoidd' is not a DPOConfig "
         "loss_type; valid values: sigmoid, hinge, ipo"),
        (lambda d: d.update(loss_type=["sigmoid", "bogus"]), "loss_type 'bogus' is not"),
        (lambda d: d.update(f_divergence_type="kl"), "valid values: reverse_kl, forward_kl"),
        (lambda d: _as_sft(d, chat_template_path="missing.jinja"), "chat_template_path "
         "'missing.jinja' not found"),
    ],
)
def test_bad_recipe_gets_one_line_error(tmp_path: Path, edit, message: str):
    recipe = _variant(tmp_path, edit)
    with pytest.raises(UserError) as err:
        _dry_run(recipe)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_hub_parent_accepted_offline_and_qlora_zero3_needs_quant_storage(tmp_path: Path):
    def qlora(d):
        d.update(model_name_or_path="allenai/OLMo-2-0425-1B-SFT", use_peft=True,
                 load_in_4bit=True, use_cpu=False)
        d["stagesweep"]["accelerate_config"] = "deepspeed_zero3"

    recipe = _variant(tmp_path, qlora)
    loose = ["stagesweep.allow_unpinned=true"]
    with pytest.raises(UserError, match="QLoRA under ZeRO-3/FSDP .* bnb_4bit_quant_storage"):
        _dry_run(recipe, loose)
    assert _dry_run(recipe, ["bnb_4bit_quant_storage=bfloat16", *loose])
    with pytest.raises(UserError, match="load_in_8bit cannot be sharded"):
        _dry_run(recipe, ["load_in_4bit=false", "load_in_8bit=true", *loose],
                 accelerate_config="fsdp2")


SHA_MODEL = "a" * 40
SHA_DATA = "b" * 40


def _hub_variant(tmp_path: Path, model_revision: str, data_revision: str | None) -> Path:
    """The tiny DPO recipe pointed at a hub parent and a hub dataset (never downloaded here)."""

    def hub(d):
        d.pop("datasets")
        d.update(model_name_or_path="allenai/OLMo-2-0425-1B-SFT", model_revision=model_revision,
                 dataset_name="allenai/olmo-2-0425-1b-preference-mix")
        d["stagesweep"]["dataset_revision"] = data_revision

    return _variant(tmp_path, hub)


def test_unpinned_hub_ids_are_refused_by_name_unless_allowed(tmp_path: Path, capsys):
    from stagesweep.cli import main

    recipe = _hub_variant(tmp_path, "main", None)
    assert main(["train", str(recipe), "--dry-run"]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert "unpinned hub ids: allenai/OLMo-2-0425-1B-SFT (model_revision); " \
        "allenai/olmo-2-0425-1b-preference-mix (stagesweep.dataset_revision)" in line
    assert "stagesweep.allow_unpinned=true" in line
    # what would be downloaded is on screen with the refusal
    assert "allenai/OLMo-2-0425-1B-SFT @ main (UNPINNED" in captured.out
    # a short sha or a branch is not a pin
    with pytest.raises(UserError, match="OLMo-2-0425-1B-SFT \\(model_revision\\)"):
        _dry_run(_hub_variant(tmp_path, "a1847df", SHA_DATA))
    assert main(["train", str(recipe), "--dry-run", "stagesweep.allow_unpinned=true"]) == 0


def test_dry_run_prints_pinned_revisions(tmp_path: Path, capsys):
    from stagesweep.cli import main

    recipe = _hub_variant(tmp_path, SHA_MODEL, SHA_DATA)
    assert main(["train", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [
        "hub revisions:",
        f"  model_name_or_path: allenai/OLMo-2-0425-1B-SFT @ {SHA_MODEL}",
        f"  dataset_name: allenai/olmo-2-0425-1b-preference-mix @ {SHA_DATA}",
    ]
    assert out[3].startswith("recipe ok; would write")


def test_lineage_manifest_records_the_pinned_revisions(tmp_path: Path):
    from stagesweep.train.recipe import load_recipe, resolve_parent
    from stagesweep.train.run import _build_config, _manifest

    spec = load_recipe(_hub_variant(tmp_path, SHA_MODEL, SHA_DATA))
    args = _build_config(spec, for_validation=True)
    manifest = _manifest(spec, resolve_parent(spec, build=False), [], args)
    assert manifest["parent"] == {"hub_id": "allenai/OLMo-2-0425-1B-SFT", "revision": SHA_MODEL}
    assert manifest["hub_revisions"] == {
        "allenai/OLMo-2-0425-1B-SFT": SHA_MODEL,
        "allenai/olmo-2-0425-1b-preference-mix": SHA_DATA,
    }
    assert manifest["recipe"]["stagesweep"]["dataset_revision"] == SHA_DATA


def test_shipped_recipes_pin_what_was_verified_and_say_which_ids_are_not(monkeypatch):
    """A pin in a shipped recipe is a full sha; every unpinned id is marked UNPINNED where it
    is set, so the gap is visible in the file and in recipes/README.md."""
    from stagesweep.train.recipe import hub_pins, load_recipe

    table = (REPO / "recipes" / "README.md").read_text()
    for recipe in TRAINING_RECIPES:
        text = recipe.read_text()
        for pin in hub_pins(load_recipe(recipe)):
            assert pin.hub_id in table, f"{pin.hub_id} missing from recipes/README.md"
            if not pin.pinned:
                key = pin.revision_key.removeprefix("stagesweep.")
                assert any(line.strip().startswith(f"{key}:") and "UNPINNED" in line
                           for line in text.splitlines()), (recipe, pin.hub_id)


def test_documented_values_come_from_the_installed_trl():
    from trl import DPOConfig, KTOConfig

    from stagesweep.train.recipe import documented_choices

    dpo = documented_choices(DPOConfig)
    assert {"sigmoid", "sigmoid_norm", "ipo", "apo_zero"} <= set(dpo["loss_type"])
    assert "reverse_kl" in dpo["f_divergence_type"]
    assert {"kto", "apo_zero_unpaired"} <= set(documented_choices(KTOConfig)["loss_type"])


def test_overrides_are_typed_and_reach_the_stage_block(tmp_path: Path):
    from stagesweep.train.recipe import load_recipe

    spec = load_recipe(TINY_DPO, ["learning_rate=3e-5", "use_cpu=true",
                                  "stagesweep.stage=dpo2", f"output_dir={tmp_path}"])
    assert spec.training["learning_rate"] == pytest.approx(3e-5)
    assert spec.training["use_cpu"] is True
    assert spec.stagesweep.stage == "dpo2" and spec.output_dir == tmp_path
    assert spec.resolved["stagesweep"]["stage"] == "dpo2"
    with pytest.raises(UserError, match="is not KEY=VALUE"):
        load_recipe(TINY_DPO, ["learning_rate"])


def test_sweep_specs_pin_their_hub_pools_or_mark_them():
    import re

    from stagesweep.evaluate.spec import load_spec

    table = (REPO / "recipes" / "README.md").read_text()
    for path in sorted((REPO / "recipes" / "sweeps").glob("*.yaml")):
        lines = path.read_text().splitlines()
        for name, pool in load_spec(path).pools.items():
            if not pool.hub:
                continue
            if pool.revision and re.fullmatch(r"[0-9a-f]{40}", pool.revision):
                continue
            assert pool.hub in table, f"{path.name}: {name} ({pool.hub}) not in recipes/README.md"
            at = next(i for i, line in enumerate(lines) if f"hub: {pool.hub}" in line)
            assert "revision:" in lines[at + 1] and "UNPINNED" in lines[at + 1], (
                f"{path.name}: {name} unpinned without a mark under its hub line")


TINY_KTO = REPO / "recipes" / "tiny" / "kto.yaml"


@pytest.mark.parametrize(
    ("recipe", "overrides", "keys", "trl_says"),
    [
        (TINY_DPO, ["f_divergence_type=forward_kl", "loss_type=apo_zero"],
         "f_divergence_type with loss_type", "only supported for the following loss types"),
        (TINY_DPO, ["use_weighting=true", "loss_type=aot"], "use_weighting with loss_type",
         "weighting is not implemented"),
        (TINY_DPO, ["loss_type=exo_pair"], "label_smoothing with loss_type exo_pair",
         "Label smoothing must be greater than 0.0"),
        (TINY_KTO, ["train_sampling_strategy=random"], "train_sampling_strategy with loss_type",
         "requires `train_sampling_strategy='sequential'`"),
        (TINY_KTO, ["per_device_train_batch_size=1", "stagesweep.global_batch_size=1"],
         "per_device_train_batch_size with loss_type", "batch size must be > 1"),
    ],
    ids=["f_divergence", "weighting_aot", "exo_pair", "kto_sampling", "kto_batch"],
)
def test_trainer_init_refusals_are_caught_by_dry_run_and_still_made_by_trl(
        recipe: Path, overrides: list[str], keys: str, trl_says: str, tmp_path: Path):
    import re

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stagesweep.tiny_model import ensure_tiny_model
    from stagesweep.train.methods import import_object
    from stagesweep.train.recipe import load_recipe
    from stagesweep.train.run import _build_config

    with pytest.raises(UserError) as err:
        _dry_run(recipe, overrides)
    assert f": {keys}: " in str(err.value) and "\n" not in str(err.value)

    # The mirrored rule still matches TRL: the real trainer refuses the same config.
    spec = load_recipe(recipe, [*overrides, f"output_dir={tmp_path}"])
    user = [{"role": "user", "content": "Hi?"}]
    rows = ([{"prompt": user, "chosen": [{"role": "assistant", "content": "Hello."}],
              "rejected": [{"role": "assistant", "content": "No."}]}] * 4
            if spec.stagesweep.method.value == "dpo" else
            [{"prompt": user, "completion": [{"role": "assistant", "content": "Hello."}],
              "label": i % 2 == 0} for i in range(4)])
    tiny = ensure_tiny_model("olmo3")
    with pytest.raises((ValueError, NotImplementedError), match=re.escape(trl_says)):
        import_object(spec.trainer_path)(
            model=AutoModelForCausalLM.from_pretrained(tiny),
            args=_build_config(spec, for_validation=True),
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(tiny),
        )


def test_assistant_only_loss_needs_generation_blocks_in_a_shipped_template(tmp_path: Path):
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    recipe = _variant(tmp_path, lambda d: _as_sft(d, chat_template_path=str(plain),
                                                  assistant_only_loss=True))
    with pytest.raises(UserError, match=r"needs \{% generation %\} blocks") as err:
        _dry_run(recipe)
    assert "\n" not in str(err.value)
    marked = tmp_path / "marked.jinja"
    marked.write_text("{% for m in messages %}{% generation %}{{ m['content'] }}"
                      "{% endgeneration %}{% endfor %}")
    assert _dry_run(recipe, [f"chat_template_path={marked}"])
