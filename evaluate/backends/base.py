"""The generation-backend contract shared by the sweep, the judges and the benchmarks.

A backend turns token-exact prompts into completions. Prompts arrive already rendered (the
sweep owns chat templates), so every backend sees byte-identical input and two backends can be
compared answer for answer. Backends yield results as batches finish, so the store can commit
them and a killed sweep loses at most one batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; the study does not state its own, so greedy is the default."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 8
    # End-of-turn ids of the checkpoint's chat template; generation stops on any of them.
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete. `key` is the sweep's unit id (or a judge's item id).

    `continuations`, for a backend whose `scores_while_generating` says yes, are also scored
    (as in a ScoreRequest) on the prompt's prefill, and come back as `Generation.logprobs`."""

    key: str
    prompt_ids: tuple[int, ...]
    prompt_text: str
    continuations: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Generation:
    key: str
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str = "stop"  # "stop" | "length"
    sample: int = 0
    extra: dict = field(default_factory=dict)
    # summed log-probability of each of the request's continuations, when it had any
    logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ScoreRequest:
    """Continuations to score after one prompt (teacher-forced, no sampling).

    `continuations` are token ids that follow `prompt_ids` directly; `openings` are the same
    continuations as text (for servers that tokenize text themselves), in the same order."""

    key: str
    prompt_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    prompt_text: str = ""
    openings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Score:
    """Summed log-probability of each continuation of a ScoreRequest, in its order."""

    key: str
    logprobs: tuple[float, ...]


# Characters of the prompt's end re-tokenized with an opening to see how they join: the
# assistant header (`<|im_start|>assistant\n`, `<|start_header_id|>assistant<|end_header_id|>
# \n\n`) fits, and every prompt of a sweep ends with the same one, so this is computed once.
_TAIL_CHARS = 64


def continuation_ids(tokenizer: Any, prompt_text: str, opening: str,
                     cache: dict | None = None) -> tuple[int, ...]:
    """Token ids of `opening` as it would continue `prompt_text`: the tokenization of
    tail + opening after the tail's own ids. If the two merge across the boundary (a template
    ending in a space, say), no continuation of the prompt's ids spells the opening, and the
    opening's own tokenization is scored after the prompt as rendered."""
    tail = prompt_text[-_TAIL_CHARS:]
    key = (tail, opening)
    if cache is not None and key in cache:
        return cache[key]
    head = tokenizer(tail, add_special_tokens=False)["input_ids"]
    full = tokenizer(tail + opening, add_special_tokens=False)["input_ids"]
    if full[: len(head)] == head and len(full) > len(head):
        ids = tuple(full[len(head):])
    else:
        ids = tuple(tokenizer(opening, add_special_tokens=False)["input_ids"])
    if cache is not None:
        cache[key] = ids
    return ids


class Backend(Protocol):
    name: str

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        config: GenerationConfig,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Generation]:
        """Yield one Generation per request and sample, in any order, as they finish."""
        ...

    def score(
        self,
        requests: Sequence[ScoreRequest],
        config: GenerationConfig,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Score]:
        """Yield one Score per request, in any order (`outcome: logprob`)."""
        ...

    def scores_while_generating(self, config: GenerationConfig) -> bool:
        """Whether `generate` scores its requests' continuations on the prefill it decodes
        from, so a judged and scored sweep walks its prompts once instead of twice."""
        ...

    def close(self) -> None:
        """Free the model (GPU memory) before the next checkpoint loads."""
        ...


# name -> "module:Class"; resolved on use so heavy backends are imported only when chosen.
BACKENDS: dict[str, str] = {}


def register_backend(name: str, target: str) -> None:
    BACKENDS[name] = target


register_backend("hf", "stagesweep.evaluate.backends.hf:HFBackend")
register_backend("openai", "stagesweep.evaluate.backends.openai:OpenAIBackend")
register_backend("vllm", "stagesweep.evaluate.backends.vllm:VLLMBackend")


def get_backend_class(name: str) -> type:
    from stagesweep.cli import UserError

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def answer_text(tokenizer: Any, ids: Sequence[int], drop: Iterable[int]) -> str:
    """Text of an answer without its trailing end-of-turn/padding ids (`drop`). Other special
    tokens are kept: harmony answers carry their channel markers, which reasoning stripping
    reads. Every in-process backend decodes this way, so their texts compare equal."""
    ids, drop = list(ids), set(drop)
    while ids and ids[-1] in drop:
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=False)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
