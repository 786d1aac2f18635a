"""Separate a reasoning model's private trace from its final answer before judging.

A judge must see only what the user is shown: a trace that deliberates about a harmful request
and then refuses would otherwise read as compliance (and the reverse). An answer whose final
part never arrives (no final channel, a think block cut off by `max_new_tokens`) is not a
refusal either: it is returned as `None` so the sweep labels it `no_final_answer`.

Families:
- ``harmony`` (GPT-OSS): messages tagged ``<|channel|>analysis`` / ``<|channel|>final``. The same
  answer decoded with special tokens skipped (as `transformers serve` and vLLM return it) reads
  ``analysis...assistantfinal...``; both spellings are understood.
- ``think`` (OLMo Think, Qwen3, DeepSeek-R1 style): ``<think>...</think>`` then the answer. OLMo
  Think's template opens the block in the generation prompt, so the completion may start inside
  it and show only the closing tag.
- ``gemma4`` (Gemma 4): a thought in ``<|channel>thought\n...<channel|>`` before the answer. Both
  markers are special tokens, so answers must be decoded with special tokens kept (the sweep does
  for every family in `SPECIAL_TOKEN_FAMILIES`); a thought that never closes is no answer.
- ``plain``: no trace; the whole text is the answer.
"""

from __future__ import annotations

import re

FAMILIES = ("harmony", "think", "gemma4", "plain")
# Families whose trace markers are special tokens: their answers are split before any decoding
# that skips special tokens would erase the boundary.
SPECIAL_TOKEN_FAMILIES = ("harmony", "gemma4")

# Harmony message boundaries; a final message ends at the first of these.
_HARMONY_END = re.compile(r"<\|(?:end|return|call)\|>")
# `<|channel|>final<|message|>` possibly followed by a `<|constrain|>...` in tool use.
_HARMONY_FINAL = re.compile(r"<\|channel\|>\s*final(?:\s*<\|constrain\|>[^<]*)?\s*<\|message\|>")
_HARMONY_ANALYSIS = re.compile(r"<\|channel\|>\s*analysis\s*<\|message\|>")
# Skipped-special-token spelling: `<|channel|>final<|message|>` decodes to `final`, preceded by
# the role `assistant` of a new message (`<|start|>assistant`); the first message may omit it
# because the generation prompt already contained `<|start|>assistant`.
_HARMONY_BARE_FINAL = re.compile(r"(?:^|assistant)final")
_HARMONY_BARE_ANALYSIS = re.compile(r"^\s*analysis")

_GEMMA4_OPEN = re.compile(r"<\|channel>(?:thought\n?)?")
_GEMMA4_CLOSE = "<channel|>"
# End-of-turn and document-end tokens a decoded answer may still carry.
_GEMMA4_END = re.compile(r"(?:<turn\|>|<eos>)+\s*$")

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def split_reasoning(text: str, family: str) -> tuple[str | None, str | None]:
    """Return ``(reasoning, final_answer)``; ``final_answer`` is None when the answer never
    reached its final part. ``reasoning`` is None when the text carried no trace."""
    if family == "plain":
        return None, text.strip()
    if family == "think":
        return _split_think(text)
    if family == "harmony":
        return _split_harmony(text)
    if family == "gemma4":
        return _split_gemma4(text)
    from stagesweep.cli import UserError

    raise UserError(f"unknown reasoning family {family!r}; choose one of {', '.join(FAMILIES)}")


def _split_think(text: str) -> tuple[str | None, str | None]:
    close = text.rfind(_THINK_CLOSE)
    if close < 0:
        # An opened block that never closed is a trace cut short, not an answer.
        if _THINK_OPEN in text:
            return text.split(_THINK_OPEN, 1)[1].strip(), None
        return None, text.strip()
    head = text[:close]
    # No opening tag: the template opened the block and the completion starts inside it.
    reasoning = head.split(_THINK_OPEN, 1)[1] if _THINK_OPEN in head else head
    return reasoning.strip(), text[close + len(_THINK_CLOSE) :].strip()


def _split_gemma4(text: str) -> tuple[str | None, str | None]:
    text = _GEMMA4_END.sub("", text)
    close = text.rfind(_GEMMA4_CLOSE)
    opened = _GEMMA4_OPEN.search(text)
    if close < 0:
        if opened:  # a thought cut off before its channel closed never reached the answer
            return text[opened.end() :].strip() or None, None
        return None, text.strip()
    head = text[:close]
    opened = _GEMMA4_OPEN.search(head)
    reasoning = head[opened.end() :] if opened else head
    return reasoning.strip() or None, text[close + len(_GEMMA4_CLOSE) :].strip()


def _split_harmony(text: str) -> tuple[str | None, str | None]:
    if "<|channel|>" in text or "<|message|>" in text:
        return _split_harmony_tokens(text)
    return _split_harmony_bare(text)


def _split_harmony_tokens(text: str) -> tuple[str | None, str | None]:
    finals = list(_HARMONY_FINAL.finditer(text))
    head = text[: finals[-1].start()] if finals else text
    traces = []
    for match in _HARMONY_ANALYSIS.finditer(head):
        body = head[match.end() :]
        end = _HARMONY_END.search(body)
        traces.append(body[: end.start()] if end else body)
    reasoning = "\n".join(t.strip() for t in traces) or None
    if not finals:
        return reasoning, None
    body = text[finals[-1].end() :]
    end = _HARMONY_END.search(body)
    return reasoning, (body[: end.start()] if end else body).strip()


def _split_harmony_bare(text: str) -> tuple[str | None, str | None]:
    finals = list(_HARMONY_BARE_FINAL.finditer(text))
    if not finals:
        # Every harmony message names its channel: text with no final one never answered.
        analysis = _HARMONY_BARE_ANALYSIS.match(text)
        return (text[analysis.end() :] if analysis else text).strip() or None, None
    head = text[: finals[-1].start()]
    analysis = _HARMONY_BARE_ANALYSIS.match(head)
    reasoning = (head[analysis.end() :] if analysis else head).strip() or None
    return reasoning, text[finals[-1].end() :].strip()


def detect_family(tokenizer_or_template: object) -> str:
    """Guess the reasoning family from a tokenizer (its chat template and vocabulary) or from a
    chat template string: harmony or Gemma 4 channels win over think tags; anything else is plain.

    Erring towards "think" is safe: an answer without think tags splits exactly as "plain".
    """
    if isinstance(tokenizer_or_template, str):
        template, closes_think = tokenizer_or_template, False
    else:
        template = getattr(tokenizer_or_template, "chat_template", None) or ""
        if isinstance(template, dict):  # named templates: judge by all of them
            template = "\n".join(template.values())
        get_vocab = getattr(tokenizer_or_template, "get_vocab", None)
        closes_think = get_vocab is not None and _THINK_CLOSE in get_vocab()
    if "<|channel|>" in template:
        return "harmony"
    if "<|channel>" in template or "<|think|>" in template:  # Gemma 4's thought markers
        return "gemma4"
    if closes_think or _THINK_OPEN in template or _THINK_CLOSE in template:
        return "think"
    return "plain"
