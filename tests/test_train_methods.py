"""Every method in the registry trains for real (TRL on a tiny model, CPU), in one process so
the libraries are imported once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stagesweep.cli import UserError
from stagesweep.lineage import read_manifest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny"
# Steps 1 and 2 both update the weights (no warm-up), so step 2's loss differs from step 1's.
FAST = ["max_steps=2", "save_steps=2", "stagesweep.accelerate_config=null"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _losses(out: Path, key: str = "loss") -> list[float]:
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return [h[key] for h in state["log_history"] if key in h]


@pytest.mark.parametrize(
    ("recipe", "method"),
    [
        ("sft", "sft"),
        ("dpo", "dpo"),
        ("ipo", "dpo"),
        ("kto", "kto"),
        ("orpo", "orpo"),
        ("cpo", "cpo"),
        ("simpo", "simpo"),
    ],
)
def test_method_trains(recipe: str, method: str, tmp_path: Path):
    from stagesweep.tiny_model import ensure_tiny_model
    from stagesweep.train.run import train

    out = train(TINY / f"{recipe}.yaml", [f"output_dir={tmp_path / recipe}", *FAST])
    manifest = read_manifest(out)
    assert manifest["method"] == method and manifest["global_step"] == 2
    if method in ("dpo", "kto"):
        assert manifest["reference"] == "frozen_copy"
    assert manifest["world_size"] == 1
    assert read_manifest(out / "checkpoint-2")["global_step"] == 2
    losses = _losses(out)
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # logged and not NaN
    assert losses[0] != losses[1], "the first step changed nothing"
    base = _tensors(ensure_tiny_model("olmo3"))
    trained = _tensors(out)
    changed = [k for k in base if k in trained and not base[k].equal(trained[k])]
    assert changed, "no weight moved"


def test_simpo_is_cpo_with_pinned_loss(tmp_path: Path):
    from stagesweep.train.recipe import load_recipe

    recipe = load_recipe(TINY / "simpo.yaml", [f"output_dir={tmp_path}"])
    assert recipe.training["loss_type"] == "simpo" and recipe.training["cpo_alpha"] == 0.0
    with pytest.raises(UserError, match="simpo.yaml: method 'simpo' means loss_type='simpo'"):
        load_recipe(TINY / "simpo.yaml", ["loss_type=sigmoid"])


def test_custom_method_example_trains(tmp_path: Path, monkeypatch):
    from stagesweep.train.run import train

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    custom = [
        "stagesweep.method=custom",
        "stagesweep.trainer=custom_method_example:MarginDPOTrainer",
        "margin=0.3",
    ]
    out = train(TINY / "dpo.yaml", [f"output_dir={tmp_path / 'margin'}", *FAST, *custom])
    manifest = read_manifest(out)
    assert manifest["trainer"] == "custom_method_example:MarginDPOTrainer"
    assert manifest["recipe"]["margin"] == 0.3
    # the example's own loss ran: it logs the quantity only it computes
    assert len(_losses(out, "margin_delta")) == 2
    losses = _losses(out)
    assert losses[0] != losses[1]
    # its added field is validated like TRL's own
    with pytest.raises(UserError, match="unknown key 'margn'; did you mean 'margin'"):
        train(TINY / "dpo.yaml", [*custom, "margn=0.3"], dry_run=True)


def test_custom_trainer_must_subclass_a_trl_trainer(tmp_path: Path):
    from stagesweep.train.recipe import load_recipe

    with pytest.raises(UserError, match="does not subclass a TRL trainer"):
        load_recipe(
            TINY / "dpo.yaml",
            ["stagesweep.method=custom", "stagesweep.trainer=pathlib:Path"],
        )


def test_lora_dpo_adapter_and_merged_export(tmp_path: Path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from stagesweep.tiny_model import ensure_tiny_model
    from stagesweep.train.run import train

    out = train(TINY / "lora_dpo.yaml", [f"output_dir={tmp_path / 'lora'}", *FAST])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "adapter did not train"
    manifest = read_manifest(out)
    assert manifest["reference"] == "adapter_disabled"  # no second copy of the model
    assert manifest["adapter"]["merged"] is True
    assert manifest["base"] == manifest["parent"]
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("olmo3"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base(ids).logits)


def test_base_without_template_gets_named_one(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from stagesweep.chat_templates import FAMILIES
    from stagesweep.tiny_model import ensure_tiny_model
    from stagesweep.train.run import train

    # A "base model" as many ship: no chat template, pad == eos, stops only on document end.
    base_dir = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(ensure_tiny_model("olmo3"))
    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_model("olmo3"))
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
    tok.save_pretrained(base_dir)
    model.save_pretrained(base_dir)
    (base_dir / "chat_template.jinja").unlink(missing_ok=True)

    with pytest.raises(UserError, match="no chat template; set stagesweep.chat_template"):
        train(TINY / "sft.yaml", [f"model_name_or_path={base_dir}", *FAST])
    # a parent template without {% generation %} blocks cannot mask prompts: refused before
    # the weights load, not by TRL after
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(base_dir)
    with pytest.raises(UserError, match="parent .* needs \\{% generation %\\} blocks"):
        train(TINY / "sft.yaml", [f"model_name_or_path={base_dir}", *FAST,
                                  "assistant_only_loss=true"])
    tok.chat_template = None
    tok.save_pretrained(base_dir)
    (base_dir / "chat_template.jinja").unlink(missing_ok=True)
    out = train(
        TINY / "sft.yaml",
        [f"model_name_or_path={base_dir}", f"output_dir={tmp_path / 'sft'}", *FAST,
         "stagesweep.chat_template=olmo3"],
    )
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == FAMILIES["olmo3"].template
    assert saved.pad_token_id != saved.eos_token_id
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert saved.convert_tokens_to_ids("<|im_end|>") == stops[0]


def test_wandb_offline_run_logs_loss(tmp_path: Path, monkeypatch):
    from stagesweep.train.run import train

    # No key and no WANDB_DIR: the run is offline and lands next to the checkpoints.
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = train(TINY / "sft.yaml", [f"output_dir={tmp_path / 'sft'}", *FAST, "report_to=wandb"])
    run_id = read_manifest(out)["wandb_run_id"]
    assert run_id
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    (wandb_file,) = runs[0].glob("*.wandb")
    # the run's event log records the training loss (stored as train/loss)
    assert b"train/loss" in wandb_file.read_bytes()
    # the defaults were for that run only
    assert "WANDB_DIR" not in os.environ and "WANDB_MODE" not in os.environ


def test_precomputed_reference_log_probs(tmp_path: Path):
    from stagesweep.train.run import train

    out = train(TINY / "dpo.yaml", [f"output_dir={tmp_path}", *FAST,
                                    "precompute_ref_log_probs=true"])
    assert read_manifest(out)["reference"] == "precomputed"
    losses = _losses(out)
    assert len(losses) == 2 and losses[0] != losses[1]


def test_pad_equal_to_eos_gets_its_own_token_and_rows(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from stagesweep.tiny_model import ensure_tiny_model
    from stagesweep.train.run import train

    # A parent that pads with its end-of-turn token and has no spare pad token in its vocab.
    source = ensure_tiny_model("llama")
    parent = tmp_path / "parent"
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(parent)
    model.save_pretrained(parent)
    rows = model.get_input_embeddings().num_embeddings
    assert "<|pad|>" not in tok.get_vocab()

    # DPO: the frozen reference must get the new rows too, or its forward pass would fail.
    out = train(TINY / "dpo.yaml", [f"model_name_or_path={parent}", f"output_dir={tmp_path / 'o'}",
                                    *FAST])
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token == "<|pad|>" and saved.pad_token_id != saved.eos_token_id
    trained = AutoModelForCausalLM.from_pretrained(out)
    assert trained.get_input_embeddings().num_embeddings == len(saved) > rows
    assert GenerationConfig.from_pretrained(out).pad_token_id == saved.pad_token_id
    assert read_manifest(out)["reference"] == "frozen_copy"


def test_dataset_of_the_wrong_shape_is_refused_by_column(tmp_path: Path):
    from stagesweep.train.run import train

    sft_data = "datasets=[{path: json, data_files: data/sft.jsonl, split: train}]"
    with pytest.raises(UserError, match="method 'dpo' trains on chosen/rejected columns; the "
                       "dataset's 'train' split has messages"):
        train(TINY / "dpo.yaml", [sft_data, f"output_dir={tmp_path}"])


def _olmo2_mix_rows() -> list[dict]:
    """Rows shaped like allenai/olmo-2-1124-7b-preference-mix: a plain-text `prompt` beside
    chosen/rejected conversations that repeat it as their first (user) turn."""
    pairs = [("What do bees make?", "Bees make honey from nectar.", "No idea."),
             ("How many days are in a week?", "A week has seven days.", "Ask someone else."),
             ("Name a yellow fruit.", "A banana is yellow.", "Fruit."),
             ("What is two plus three?", "Two plus three is five.", "I don't know.")]
    return [{"id": f"row-{i}", "source": "synthetic", "prompt": prompt,
             "chosen": [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": good}],
             "rejected": [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": bad}],
             "chosen_rating": 5.0, "rejected_rating": 1.0}
            for i, (prompt, good, bad) in enumerate(pairs)]


def _recording_trainer():
    from trl import DPOTrainer

    class RecordingDPOTrainer(DPOTrainer):
        """Writes down the first training example exactly as TRL tokenized it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            first = {k: v for k, v in self.train_dataset[0].items() if k.endswith("_ids")}
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / "first_example.json").write_text(json.dumps(first))

    return RecordingDPOTrainer


def __getattr__(name: str):
    # `stagesweep.trainer: test_train_methods:RecordingDPOTrainer` imports trl only when asked
    if name == "RecordingDPOTrainer":
        return _recording_trainer()
    raise AttributeError(name)


def test_olmo2_shaped_preference_table_trains_as_conversational(tmp_path: Path, monkeypatch):
    from transformers import AutoTokenizer

    from stagesweep.train.run import train

    data = tmp_path / "mix.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _olmo2_mix_rows()))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = train(TINY / "dpo.yaml", [
        f"output_dir={tmp_path / 'dpo'}", *FAST,
        f"datasets=[{{path: json, data_files: {data}, split: train}}]",
        "stagesweep.method=custom",
        "stagesweep.trainer=test_train_methods:RecordingDPOTrainer",
    ])
    assert read_manifest(out)["global_step"] == 2
    losses = _losses(out)
    assert losses[0] != losses[1]

    # What TRL tokenized: the chat template's rendering of the user turn, then the answer and
    # the end-of-turn token; not the Python repr of a message list, not the prompt twice.
    tok = AutoTokenizer.from_pretrained(out)
    first = json.loads((out / "first_example.json").read_text())
    row = _olmo2_mix_rows()[0]
    rendered = tok.apply_chat_template(row["chosen"][:1], tokenize=False,
                                       add_generation_prompt=True)
    assert first["prompt_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    prompt_text = tok.decode(first["prompt_ids"])
    assert prompt_text.count(row["prompt"]) == 1 and "'role'" not in prompt_text
    assert tok.decode(first["chosen_ids"]).startswith(row["chosen"][1]["content"])
    assert tok.decode(first["chosen_ids"]).rstrip().endswith("<|im_end|>")


def test_text_prompt_before_answer_only_lists_becomes_a_user_turn():
    from datasets import Dataset

    from stagesweep.train.run import conversational_pairs

    rows = [{"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    fixed = conversational_pairs(Dataset.from_list(rows))
    assert fixed[0]["prompt"] == [{"role": "user", "content": "Hi?"}]
    whole = conversational_pairs(Dataset.from_list(_olmo2_mix_rows()))
    assert "prompt" not in whole.column_names and whole[0]["chosen"][0]["role"] == "user"
    already = Dataset.from_list([{**rows[0], "prompt": [{"role": "user", "content": "Hi?"}]}])
    assert conversational_pairs(already)[0]["prompt"] == [{"role": "user", "content": "Hi?"}]


# open-instruct's `tulu` chat template (open_instruct/dataset_transformation.py CHAT_TEMPLATES),
# written out here; `--add_bos` prepends "{{ bos_token }}" to it.
UPSTREAM_TULU = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
)


def test_olmo2_sft_template_renders_as_open_instruct_tulu_with_bos(tmp_path: Path):
    from transformers import AutoTokenizer

    from stagesweep.train.run import train

    shipped = REPO / "recipes" / "olmo2-1b" / "tulu_add_bos.jinja"
    out = train(TINY / "sft.yaml", [f"output_dir={tmp_path / 'sft'}", *FAST,
                                    f"chat_template_path={shipped}", "assistant_only_loss=true"])
    assert read_manifest(out)["global_step"] == 2
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == shipped.read_text()
    tok.bos_token = "<|endoftext|>"  # OLMo 2's bos; the tiny tokenizer has none
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
         {"role": "assistant", "content": "Bye."}],
        [{"role": "user", "content": "Hi?"}],
    ]
    for chat in chats:
        for prompt in (False, True):
            ours = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            theirs = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt,
                                             chat_template="{{ bos_token }}" + UPSTREAM_TULU)
            assert ours == theirs and ours.startswith(tok.bos_token)
