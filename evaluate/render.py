"""Turn a work unit into the exact prompt a checkpoint sees, through its own chat template.

The benign-demonstration effect is measured on demos packed as real conversation turns, so
the checkpoint's template decides every special token; nothing here hand-writes a format.
Prompts are tokenized once, here, so every backend (in-process or served) receives the same
token ids and two backends can be compared answer for answer.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagesweep.cli import UserError
from stagesweep.evaluate.plan import WorkUnit
from stagesweep.evaluate.pools import DemoPool
from stagesweep.evaluate.spec import OPENINGS, Packing, SweepSpec

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
# Context sizes at or above this are tokenizer placeholders ("no limit"), not real limits.
_INSANE_CONTEXT = 10**8


def load_tokenizer(checkpoint: str, *, chat_template: str | None = None,
                   trust_remote_code: bool = False, override: bool = False) -> Any:
    """The checkpoint's tokenizer, with `chat_template` (a stagesweep.chat_templates family
    name or a .jinja file) for a checkpoint that ships none. Replacing a template the checkpoint
    has would measure another prompt format than the released one, so it needs `override`."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise UserError(f"cannot load a tokenizer from {checkpoint!r}: {err}") from None
    if chat_template:
        if tok.chat_template and not override:
            raise UserError(
                f"checkpoint {checkpoint!r} has its own chat template; --chat-template "
                f"{chat_template} (or the spec's chat_template) would replace it: pass "
                "--override-chat-template to force that"
            )
        if Path(chat_template).is_file():
            tok.chat_template = Path(chat_template).read_text()
        else:
            from stagesweep.chat_templates import get_family

            tok.chat_template = get_family(chat_template).template
    if not tok.chat_template:
        from stagesweep.chat_templates import FAMILIES

        raise UserError(
            f"checkpoint {checkpoint!r} has no chat template; pass --chat-template NAME "
            f"(one of {', '.join(FAMILIES)}, or a .jinja file), set `chat_template` in the sweep "
            "spec, or save one with tokenizer.chat_template = ... ; tokenizer.save_pretrained()"
        )
    return tok


def today() -> str:
    """The date a new sweep's prompts are rendered with (ISO); tests move this clock."""
    return datetime.date.today().isoformat()


def template_options(spec: SweepSpec) -> dict[str, Any]:
    """What every template render receives: the sweep's one render date, as the `strftime_now`
    that GPT-OSS-style templates call and as the `date_string` that Llama 3.x templates read,
    then the spec's `chat_template_kwargs` (which win). Without a fixed date, a template that
    asks for today's date renders other prompts tomorrow, and stages swept on different days
    are no longer paired."""
    day = datetime.date.fromisoformat(spec.render_date or today())
    midnight = datetime.datetime.combine(day, datetime.time())

    def strftime_now(fmt: str) -> str:
        return midnight.strftime(fmt)

    return {"strftime_now": strftime_now, "date_string": day.strftime("%d %b %Y"),
            **spec.chat_template_kwargs}


def template_sha(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(str(template).encode()).hexdigest()[:16]


def _answer(text: str, opening: str) -> str:
    # Demos show only what a user would see: a reasoning trace is not part of the answer.
    text = _THINK_BLOCK.sub("", text)
    prefix = OPENINGS[opening]
    return f"{prefix}\n{text}" if prefix else text


def build_messages(unit: WorkUnit, pools: dict[str, DemoPool], spec: SweepSpec,
                   indexes: dict[str, dict[str, int]] | None = None) -> list[dict[str, str]]:
    """The conversation: optional system prompt, the demos in the unit's order, the target."""
    indexes = indexes or {name: pool.index() for name, pool in pools.items()}
    demos = []
    for pool_name, row_id in unit.demos:
        pool, i = pools[pool_name], indexes[pool_name][row_id]
        demos.append((pool.requests[i], _answer(pool.responses[i], unit.opening)))
    targets = pools[spec.targets_key]
    target = targets.requests[indexes[spec.targets_key][unit.query_id]]
    messages = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    if spec.packing is Packing.MULTI_TURN:
        for request, answer in demos:
            messages += [{"role": "user", "content": request},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": target})
    else:
        blocks = [f"User: {request}\nAssistant: {answer}" for request, answer in demos]
        messages.append({"role": "user", "content": "\n\n".join([*blocks, target])})
    return messages


def _template_renderer(tokenizer: Any) -> Callable[..., str]:
    # transformers replaces callables passed to `apply_chat_template` by placeholder strings,
    # so a fixed `strftime_now` reaches the template only through its compiled form. The rest
    # of the context is what `apply_chat_template` gives a template: the special tokens.
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(tokenizer.get_chat_template())
    tokens = dict(tokenizer.special_tokens_map)
    return lambda messages, options: template.render(
        messages=messages, tools=None, documents=None, add_generation_prompt=True,
        **{**tokens, **options})


def _apply(render: Callable[..., str], messages: list[dict[str, str]],
           options: dict[str, Any]) -> str:
    try:
        return render(messages, options)
    except Exception as err:  # jinja raises TemplateError; others raise ValueError
        if messages[0]["role"] != "system":
            raise UserError(f"the chat template refused the conversation: {err}") from None
    # A template without a system role: fold the system prompt into the first user turn,
    # the way Gemma's own template does.
    system, first, *rest = messages
    folded = {"role": "user", "content": f"{system['content']}\n\n{first['content']}"}
    return render([folded, *rest], options)


def render_text(tokenizer: Any, messages: list[dict[str, str]], spec: SweepSpec) -> str:
    """One conversation rendered as the sweep renders it (date and template options fixed)."""
    return _apply(_template_renderer(tokenizer), messages, template_options(spec))


def render_prompt(tokenizer: Any, unit: WorkUnit, pools: dict[str, DemoPool],
                  spec: SweepSpec) -> tuple[str, list[int]]:
    """(prompt text, token ids) for one unit."""
    text = render_text(tokenizer, build_messages(unit, pools, spec), spec)
    return text, _encode(tokenizer, [text])[0]


def render_units(tokenizer: Any, units: list[WorkUnit], pools: dict[str, DemoPool],
                 spec: SweepSpec) -> tuple[list[str], list[list[int]]]:
    """Texts and ids of many units; tokenized in one batch call (the fast tokenizer runs it
    in parallel)."""
    indexes = {name: pool.index() for name, pool in pools.items()}
    render, options = _template_renderer(tokenizer), template_options(spec)
    texts = [_apply(render, build_messages(u, pools, spec, indexes), options) for u in units]
    return texts, _encode(tokenizer, texts)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # The template already wrote bos and every special token into the text.
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def context_limit(checkpoint: str, tokenizer: Any, spec: SweepSpec) -> int | None:
    """Tokens a prompt plus its answer may take: the spec's cap, else the model config's
    max_position_embeddings, else the tokenizer's model_max_length when it is a real number."""
    if spec.max_context_tokens:
        return spec.max_context_tokens
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=spec.trust_remote_code)
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    except (OSError, ValueError):
        limit = None
    if limit:
        return int(limit)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    return int(tok_limit) if tok_limit and tok_limit < _INSANE_CONTEXT else None


def reasoning_family(checkpoint: str, tokenizer: Any) -> str:
    """How to split this checkpoint's answers: a tiny model's build record says it; otherwise
    the chat template tells (harmony channels, think tags, or plain)."""
    from stagesweep.evaluate.reasoning import detect_family

    record = Path(checkpoint) / "stagesweep_tiny.json"
    if record.is_file():
        family = json.loads(record.read_text()).get("reasoning_family")
        if family:
            return family
    return detect_family(tokenizer)


def stop_token_ids(checkpoint: str, tokenizer: Any) -> tuple[int, ...]:
    """End-of-turn ids: the generation config's eos ids (what the model emits to end its
    turn), falling back to the tokenizer's eos."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(checkpoint).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
