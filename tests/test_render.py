"""Rendering through each family's own chat template (acceptance 4 of the sweep issue)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from stagesweep.cli import UserError, main
from stagesweep.evaluate.plan import build_plan
from stagesweep.evaluate.pools import DemoPool, load_pools
from stagesweep.evaluate.render import build_messages, load_tokenizer, render_prompt
from stagesweep.evaluate.spec import load_spec
from stagesweep.tiny_model import ensure_tiny_model

TINY = Path(__file__).resolve().parent.parent / "recipes" / "sweeps" / "tiny.yaml"
USER_TURN = {
    "olmo3": "<|im_start|>user\n",
    "llama": "<|start_header_id|>user<|end_header_id|>",
    "gemma": "<start_of_turn>user\n",
    "gemma4": "<|turn>user\n",
    "gpt-oss": "<|start|>user<|message|>",
}
ASSISTANT_TURN = {
    "olmo3": "<|im_start|>assistant\n",
    "llama": "<|start_header_id|>assistant<|end_header_id|>",
    "gemma": "<start_of_turn>model\n",
    "gemma4": "<|turn>model\n",
    # harmony: demo answers go in the final channel, never in analysis
    "gpt-oss": "<|start|>assistant<|channel|>final<|message|>",
}


@pytest.mark.parametrize("arch", list(USER_TURN))
def test_show_prompts_demos_as_turns_in_schedule_order(arch, tmp_path, capsys):
    ckpt = ensure_tiny_model(arch)
    assert main(["sweep", str(TINY), "--checkpoint", str(ckpt), "--out", str(tmp_path),
                 "--show-prompts", "9"]) == 0
    printed = capsys.readouterr().out
    blocks = re.split(r"^===== ", printed, flags=re.M)[1:]
    assert len(blocks) == 9
    spec = load_spec(TINY)
    pools = load_pools(spec)
    units = {u.unit_id: u for u in build_plan(spec, pools)}
    schedules = set()
    for block in blocks:
        header, text = block.split("\n", 1)
        unit = units[re.search(r"unit (\w+)", header).group(1)]
        schedules.add(unit.schedule)
        n = unit.n_harmful + unit.n_benign
        assert text.count(USER_TURN[arch]) == n + 1  # one turn per demo, then the target
        # ... and one assistant turn per demo (plus the generation prompt, except in harmony,
        # whose generation prompt leaves the channel to the model)
        assert text.count(ASSISTANT_TURN[arch]) == n + (arch != "gpt-oss")
        if arch == "gpt-oss":
            assert "<|channel|>analysis" not in text
        # each demo's request is its own user turn, in the unit's order, the target last
        pos, last = [], -1
        for pool, row_id in unit.demos:
            request = pools[pool].requests[pools[pool].index()[row_id]]
            last = text.index(request, last + 1)
            pos.append(last)
        target = pools["targets"].requests[pools["targets"].index()[unit.query_id]]
        assert pos == sorted(pos) and text.rindex(target) > pos[-1]
        kinds = "".join("H" if p == "harmful" else "B" for p, _ in unit.demos)
        assert header.endswith(" ".join(kinds))
        if unit.schedule == "suffix":
            assert kinds == "B" * unit.n_benign + "H" * unit.n_harmful  # harmful next to target
        if unit.schedule == "prefix":
            assert kinds == "H" * unit.n_harmful + "B" * unit.n_benign
    assert schedules == {"prefix", "suffix", "random", "middle", "interleave"}


def test_checkpoint_without_chat_template_names_the_fix(tmp_path):
    ckpt = tmp_path / "base"
    shutil.copytree(ensure_tiny_model("olmo3"), ckpt)
    (ckpt / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="has no chat template; pass --chat-template NAME"):
        load_tokenizer(str(ckpt))
    tok = load_tokenizer(str(ckpt), chat_template="olmo3")
    assert "<|im_start|>" in tok.chat_template
    code = main(["sweep", str(TINY), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                 "--dry-run"])
    assert code == 2


def _one_unit_spec(tmp_path):
    spec = load_spec(TINY)
    pools = load_pools(spec)
    unit = next(u for u in build_plan(spec, pools)
                if u.design == "format" and u.opening == "sure")
    return spec, pools, unit


def test_system_prompt_folded_when_template_has_no_system_role(tmp_path):
    spec, pools, unit = _one_unit_spec(tmp_path)
    spec.system_prompt = "Be careful."
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
        "{{ raise_exception('System role not supported') }}{%- endif -%}"
        "{{ '[' + m['role'] + ']' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}[assistant]{%- endif -%}")
    tok = load_tokenizer(str(ensure_tiny_model("llama")), chat_template=str(strict),
                         override=True)
    text, ids = render_prompt(tok, unit, pools, spec)
    assert text.startswith("[user]Be careful.\n\n")
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    # Gemma's own template folds the system prompt itself
    gemma = load_tokenizer(str(ensure_tiny_model("gemma")))
    assert render_prompt(gemma, unit, pools, spec)[0].startswith(
        "<bos><start_of_turn>user\nBe careful.\n\n")


def test_openings_single_message_and_think_stripping(tmp_path):
    spec, pools, unit = _one_unit_spec(tmp_path)
    messages = build_messages(unit, pools, spec)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(answers) == 4 and all(a.startswith("Sure I can help with that!\n") for a in answers)
    spec.packing = spec.packing.SINGLE_MESSAGE
    (single,) = build_messages(unit, pools, spec)
    assert single["role"] == "user" and single["content"].count("Assistant: Sure I can") == 4
    think = DemoPool("benign", ("x",), ("q",), ("<think>private</think>visible",))
    pools = {**pools, "benign": think}
    unit = type(unit)(**{**unit.__dict__, "demos": (("benign", "x"),), "opening": "unchanged"})
    spec.packing = spec.packing.MULTI_TURN
    assert build_messages(unit, pools, spec)[1]["content"] == "visible"
