"""The tiny checkpoints load, chat in their family's format, generate, and stop on end-of-turn."""

from __future__ import annotations

import json

import pytest

from stagesweep.tiny_model import MANIFEST, build_version, ensure_tiny_model

CONVERSATION = [
    {"role": "user", "content": "How do I cook rice?"},
    {"role": "assistant", "content": "Use two cups of water per cup of rice."},
    {"role": "user", "content": "And lentils?"},
]

# arch -> (rendered conversation with a generation prompt, end-of-turn token, reasoning family)
EXPECTED = {
    # OLMo 3 Instruct's default system prompt when the conversation has none
    "olmo3": (
        "<|im_start|>system\nYou are a helpful function-calling AI assistant. You do not "
        "currently have access to any functions. <functions></functions><|im_end|>\n"
        "<|im_start|>user\nHow do I cook rice?<|im_end|>\n"
        "<|im_start|>assistant\nUse two cups of water per cup of rice.<|im_end|>\n"
        "<|im_start|>user\nAnd lentils?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>",
        "plain",
    ),
    # Llama 3.1: the system header with both date lines is always there
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow do I cook rice?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "Use two cups of water per cup of rice.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd lentils?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        "plain",
    ),
    "gemma": (
        "<bos><start_of_turn>user\nHow do I cook rice?<end_of_turn>\n"
        "<start_of_turn>model\nUse two cups of water per cup of rice.<end_of_turn>\n"
        "<start_of_turn>user\nAnd lentils?<end_of_turn>\n<start_of_turn>model\n",
        "<end_of_turn>",
        "plain",
    ),
    "gemma4": (
        "<bos><|turn>user\nHow do I cook rice?<turn|>\n"
        "<|turn>model\nUse two cups of water per cup of rice.<turn|>\n"
        "<|turn>user\nAnd lentils?<turn|>\n<|turn>model\n",
        "<turn|>",
        "gemma4",
    ),
    "gpt-oss": (
        "<|start|>user<|message|>How do I cook rice?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>"
        "Use two cups of water per cup of rice.<|end|>"
        "<|start|>user<|message|>And lentils?<|end|><|start|>assistant",
        "<|return|>",
        "harmony",
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_tiny_model_chats_generates_and_stops_on_end_of_turn(arch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = ensure_tiny_model(arch)
    rendered, end_of_turn, reasoning_family = EXPECTED[arch]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    if arch == "gpt-oss":
        # The harmony system header comes first, then the turns exactly as written.
        assert text.startswith("<|start|>system<|message|>")
        assert "# Valid channels: analysis, commentary, final." in text
        text = text[text.index("<|end|>") + len("<|end|>") :]
    assert text == rendered

    # Special tokens are single ids, and the template's bos is not doubled by tokenization.
    enc = tok.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = enc["input_ids"][0].tolist()
    assert tok.decode(ids) == tok.apply_chat_template(
        CONVERSATION, add_generation_prompt=True, tokenize=False
    )
    if tok.bos_token is not None:
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id

    # TRL's assistant_only_loss trains on the assistant's words and its end-of-turn token only.
    masked = tok.apply_chat_template(
        CONVERSATION[:2], return_dict=True, return_assistant_tokens_mask=True
    )
    pairs = zip(masked["input_ids"], masked["assistant_masks"], strict=True)
    trained = [i for i, m in pairs if m]
    assert tok.decode(trained).endswith(f"Use two cups of water per cup of rice.{end_of_turn}")
    assert "How do I cook rice?" not in tok.decode(trained)

    eot_id = tok.convert_tokens_to_ids(end_of_turn)
    assert tok.convert_ids_to_tokens(eot_id) == end_of_turn
    assert tok.eos_token == end_of_turn
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id[0] == eot_id
    assert gen.pad_token_id == tok.pad_token_id not in gen.eos_token_id
    assert gen.do_sample is False

    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, min_new_tokens=4)
    new = out[0, enc["input_ids"].shape[1] :]
    assert new.shape == (4,)
    assert bool((new < len(tok)).all())

    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["reasoning_family"] == reasoning_family
    assert manifest["version"] == build_version()


def test_gemma_folds_system_into_first_user_turn_and_requires_alternation():
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model("gemma"))
    messages = [{"role": "system", "content": "Answer briefly."}, *CONVERSATION]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHow do I cook rice?<end_of_turn>\n"
    )
    assert "system" not in text
    with pytest.raises(TemplateError, match="alternate"):
        tok.apply_chat_template(CONVERSATION[:1] * 2, tokenize=False)


def test_harmony_trains_on_return_and_keeps_last_thinking():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model("gpt-oss"))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        *CONVERSATION,
        {"role": "assistant", "content": "Rinse them.", "thinking": "Lentils need no soaking."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert "<|start|>developer<|message|># Instructions\n\nAnswer briefly.<|end|>" in text
    assert text.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>Lentils need no soaking.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Rinse them.<|return|>"
    )


def test_olmo3_think_tags_survive_skipping_special_tokens():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_tiny_model("olmo3"))
    ids = tok("<think>hmm</think>Rice.")["input_ids"]
    assert tok.convert_tokens_to_ids("<think>") in ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hmm</think>Rice."


def test_cache_is_rebuilt_when_stale_and_reused_when_current(tmp_path):
    cache = tmp_path / "llama"
    assert ensure_tiny_model("llama", cache) == cache
    weights = (cache / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("llama", cache) == cache
    assert (cache / "model.safetensors").stat().st_mtime_ns == weights

    manifest = json.loads((cache / MANIFEST).read_text())
    (cache / MANIFEST).write_text(json.dumps({**manifest, "version": "0-old"}))
    ensure_tiny_model("llama", cache)
    assert json.loads((cache / MANIFEST).read_text())["version"] == build_version()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["llama"]


def test_unknown_arch_is_a_user_error():
    from stagesweep.cli import UserError

    with pytest.raises(UserError, match="olmo3"):
        ensure_tiny_model("mistral")


def test_concurrent_callers_share_one_build(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import stagesweep.tiny_model as tiny

    builds = []
    real_build = tiny.build_tiny_model

    def counting_build(arch, out, **kwargs):
        builds.append(out)
        return real_build(arch, out, **kwargs)

    monkeypatch.setattr(tiny, "build_tiny_model", counting_build)
    cache = tmp_path / "gpt-oss"
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: tiny.ensure_tiny_model("gpt-oss", cache), range(3)))
    assert paths == [cache] * 3
    assert len(builds) == 1
    assert (cache / "model.safetensors").exists()


def test_cli_builds_a_small_checkpoint_and_refuses_a_used_directory(tmp_path, capsys):
    from stagesweep.cli import main

    out = tmp_path / "llama-small"
    assert main(["tiny-model", "--arch", "llama", "--out", str(out), "--size", "small"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 8 and config["hidden_size"] == 384
    assert json.loads((out / MANIFEST).read_text())["size"] == "small"
    assert "reasoning family plain" in capsys.readouterr().out

    assert main(["tiny-model", "--arch", "llama", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
