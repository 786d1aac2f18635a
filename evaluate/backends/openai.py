"""Generation through any OpenAI-compatible server (vLLM, SGLang, TGI, `transformers serve`).

The sweep renders every prompt with the checkpoint's own chat template, so this backend sends
the rendered text to the plain completions endpoint (`/v1/completions`), never a chat endpoint
that would wrap it in a second template. Two details keep the server's tokens equal to the
sweep's `prompt_ids`:

- servers tokenize completion prompts with special tokens on, so a tokenizer that prepends BOS
  itself (Llama 3, Gemma) would double a BOS the template already rendered: that leading BOS
  text is dropped before sending (checked against the checkpoint's tokenizer when it can be
  loaded; a prompt that still would not re-tokenize exactly is reported once);
- generation stops on the template's end-of-turn ids: vLLM and SGLang take them as
  `stop_token_ids` (and `skip_special_tokens: false`, so their text matches the hf backend's,
  which keeps special tokens); other servers get the same tokens as `stop` strings (and stop on
  the checkpoint's `generation_config.json` eos anyway). `transformers serve` always decodes
  with special tokens skipped: for harmony models its raw text loses the channel markers, and
  `split_reasoning` reads that spelling too, so the judged final answer is the same.

Requests run concurrently on a thread pool and are retried with exponential backoff on 429,
5xx and connection errors. The API key is read from an environment variable and is never
logged, returned or written anywhere.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from stagesweep.evaluate.backends.base import (
    Generation,
    GenerationConfig,
    GenerationRequest,
    Score,
    ScoreRequest,
)

log = logging.getLogger(__name__)

# Servers known to accept vLLM's sampling extensions in the request body; `transformers serve`
# answers 422 to unknown fields, so nothing beyond the OpenAI schema is sent to anything else.
_STOP_TOKEN_ID_SERVERS = {"vllm", "sglang"}
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_MAX_BACKOFF_S = 30.0
_CHECK_PROMPTS = 32


class OpenAIBackend:
    """Completions from an OpenAI-compatible HTTP server (see the module docstring)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout: float = 600.0,
        api_key_env: str = "OPENAI_API_KEY",
        tokenizer: Any = None,
    ) -> None:
        """`model` is the server's model name (asked of `/v1/models` when None); `tokenizer`
        (a tokenizer or a path/hub id, default: the served model's name) is only used to keep
        prompts token-exact and to name stop tokens."""
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        headers = {}
        api_key = os.environ.get(api_key_env)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._checked = 0
        self._warned_split = False
        listed = self._models()
        self.model = model or listed[0]["id"]
        owners = {m.get("owned_by") for m in listed if m.get("id") == self.model}
        self.server = next(iter(owners & _STOP_TOKEN_ID_SERVERS), "openai-compatible")
        self._tokenizer = load_local_tokenizer(tokenizer if tokenizer is not None else self.model)
        # The BOS text the server's tokenizer will prepend by itself ("" when it adds none).
        self._added_bos = added_bos_text(self._tokenizer) if self._tokenizer is not None else ""

    # ------------------------------------------------------------------ public API

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        config: GenerationConfig,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Generation]:
        """Yield one Generation per request and sample as responses arrive. Requests go out in
        depth-first order of their token trie, so a server's prefix cache (vLLM, SGLang) sees
        each shared demonstration context in one run."""
        from stagesweep.evaluate.prefix_sharing import trie_order

        stop_fields = self._stop_fields(config)

        def jobs() -> Iterator[tuple[str, int, dict]]:
            for request in trie_order(requests):
                prompt = self._wire_prompt(request)
                for sample in range(config.num_samples):
                    body = {
                        "model": self.model,
                        "prompt": prompt,
                        "max_tokens": config.max_new_tokens,
                        "temperature": config.temperature,
                        "top_p": config.top_p,
                        "seed": config.seed + sample,
                        **stop_fields,
                    }
                    yield request.key, sample, body

        yield from self._run(jobs(), "/completions", _completion_text, progress)

    def score(
        self,
        requests: Sequence[ScoreRequest],
        config: GenerationConfig,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Score]:
        """Log-probabilities of each request's openings from the legacy completions endpoint
        with `echo: true` and `logprobs`: the prompt plus the opening is sent as text, and the
        opening's tokens are those the server's echo places at or after the prompt's end
        (`text_offset`). Servers that do not return echoed log-probs (`transformers serve`
        ignores both fields) are a one-line error."""
        from stagesweep.evaluate.prefix_sharing import trie_order

        wire: dict[str, str] = {}  # filled as jobs go out, read as their answers arrive

        def jobs() -> Iterator[tuple[str, int, dict]]:
            for request in trie_order(requests):
                prompt = wire[request.key] = self._wire_prompt(GenerationRequest(
                    request.key, request.prompt_ids, request.prompt_text))
                for i, opening in enumerate(request.openings):
                    body = {"model": self.model, "prompt": prompt + opening, "max_tokens": 1,
                            "temperature": 0.0, "echo": True, "logprobs": 1}
                    yield request.key, i, body

        by_key = {r.key: r for r in requests}
        got: dict[str, dict[int, float]] = {}
        for key, i, payload in self._responses(jobs(), "/completions", None):
            request, prompt = by_key[key], wire[key]
            got.setdefault(key, {})[i] = self._opening_logprob(
                payload, len(prompt), len(prompt + request.openings[i]),
                len(request.continuations[i]))
            if len(got[key]) == len(request.openings):
                values = got.pop(key)
                if progress is not None:
                    progress(1)
                yield Score(key, tuple(values[j] for j in range(len(request.openings))))

    def scores_while_generating(self, config: GenerationConfig) -> bool:
        return False  # openings are scored in a pass of their own (`score`)

    def _opening_logprob(self, payload: dict, start: int, end: int, n_tokens: int) -> float:
        """Sum of the echoed log-probs of the tokens at character offsets [start, end) of the
        sent prompt. The server's `text_offset`s count the text of every echoed token, special
        ones included (vLLM puts a BOS it adds at offset 0 and the prompt's first character
        after its text), so they are anchored at the end: the one generated token's offset is
        where the sent prompt ends."""
        from stagesweep.cli import UserError

        logprobs = (payload.get("choices") or [{}])[0].get("logprobs") or {}
        values, offsets = logprobs.get("token_logprobs"), logprobs.get("text_offset")
        if not values or not offsets or len(values) != len(offsets):
            raise UserError(
                f"the {self.server} server at {self.base_url} returned no echoed prompt "
                "log-probs (echo: true, logprobs): echo logprobs are unsupported by this server "
                "(`transformers serve` ignores both); score outcome: logprob on a vLLM or "
                "SGLang server, or with --backend hf or vllm")
        shift = offsets[-1] - end
        picked = [v for v, offset in zip(values[:-1], offsets[:-1], strict=True)
                  if start + shift <= offset < end + shift]
        if not picked or any(v is None for v in picked):
            raise UserError(f"the {self.server} server at {self.base_url} echoed no log-prob "
                            "for the opening's tokens; score with --backend hf or vllm")
        if len(picked) != n_tokens and not self._warned_split:
            self._warned_split = True
            log.warning("%s tokenizes an opening into %d tokens where the checkpoint's "
                        "tokenizer gives %d; scores follow the server's tokens", self.base_url,
                        len(picked), n_tokens)
        return float(sum(picked))

    def chat(
        self,
        conversations: Sequence[tuple[str, list[dict]]],
        config: GenerationConfig,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Generation]:
        """Chat completions for `(key, messages)` pairs: for judges that talk to a hosted model
        whose template only the server knows (the sweep itself always uses `generate`)."""
        jobs = [
            (
                key,
                0,
                {
                    "model": self.model,
                    "messages": messages,
                    "max_tokens": config.max_new_tokens,
                    "temperature": config.temperature,
                    "top_p": config.top_p,
                    "seed": config.seed,
                },
            )
            for key, messages in conversations
        ]
        yield from self._run(jobs, "/chat/completions", _chat_text, progress)

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ request building

    def _wire_prompt(self, request: GenerationRequest) -> str:
        """The text to send so that the server's tokenizer yields exactly `prompt_ids`."""
        text = request.prompt_text
        tok = self._tokenizer
        if tok is None:
            return text
        if self._added_bos and text.startswith(self._added_bos):
            text = text[len(self._added_bos) :]
        # Checked on the first prompts only: one template, one answer; long sweeps stay cheap.
        if self._checked < _CHECK_PROMPTS:
            self._checked += 1
            if list(tok(text).input_ids) != list(request.prompt_ids):
                self._checked = _CHECK_PROMPTS
                log.warning(
                    "prompt %s does not re-tokenize to the same ids on %s; the server may see "
                    "different tokens than the hf backend would",
                    request.key,
                    self.base_url,
                )
        return text

    def _stop_fields(self, config: GenerationConfig) -> dict:
        if not config.stop_token_ids:
            return {}
        if self.server in _STOP_TOKEN_ID_SERVERS:
            # Special tokens kept, as the hf backend keeps them: harmony channel markers survive.
            return {"stop_token_ids": list(config.stop_token_ids), "skip_special_tokens": False}
        if self._tokenizer is None:
            return {}
        return {"stop": self._tokenizer.convert_ids_to_tokens(list(config.stop_token_ids))}

    # ------------------------------------------------------------------ transport

    def _models(self) -> list[dict]:
        # One retry only: an unstarted server should fail in seconds, not after a full backoff.
        response = self._request("GET", "/models", None, retries=1)
        listed = response.get("data") or []
        if not listed:
            from stagesweep.cli import UserError

            raise UserError(f"{self.base_url}/models lists no model; start the server with one")
        return listed

    def _run(
        self,
        jobs: Iterable[tuple[str, int, dict]],
        path: str,
        extract: Callable[[dict], tuple[str, str]],
        progress: Callable[[int], None] | None,
    ) -> Iterator[Generation]:
        for key, sample, payload in self._responses(jobs, path, progress):
            text, finish = extract(payload)
            # The server's own prompt length: the audit trail that the prompt stayed token-exact.
            usage = payload.get("usage") or {}
            extra = {"prompt_tokens": usage["prompt_tokens"]} if "prompt_tokens" in usage else {}
            yield Generation(key=key, text=text, finish_reason=finish, sample=sample, extra=extra)

    def _responses(
        self,
        jobs: Iterable[tuple[str, int, dict]],
        path: str,
        progress: Callable[[int], None] | None,
    ) -> Iterator[tuple[str, int, dict]]:
        """(key, index, response body) of every job, concurrently, as they arrive."""

        def one(key: str, sample: int, body: dict) -> tuple[str, int, dict]:
            return key, sample, self._request("POST", path, body)

        # A bounded window of submitted requests: prompts are built as the server drains them,
        # and a failure leaves little queued work to cancel.
        window = 2 * self.concurrency
        queued = iter(jobs)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai")
        try:
            pending = {pool.submit(one, *job) for job in itertools.islice(queued, window)}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                pending |= {pool.submit(one, *job) for job in itertools.islice(queued, len(done))}
                for future in done:
                    result = future.result()
                    if progress is not None:
                        progress(1)
                    yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _request(
        self, method: str, path: str, body: dict | None, retries: int | None = None
    ) -> dict:
        import httpx

        from stagesweep.cli import UserError

        url = self.base_url + path
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                response = self._client.request(method, url, json=body)
            except httpx.TransportError as err:
                if attempt == retries:
                    raise UserError(
                        f"cannot reach {url} ({type(err).__name__}): is the server running? "
                        "start one with `vllm serve MODEL` or `transformers serve MODEL`"
                    ) from None
            else:
                if response.status_code < 400:
                    return response.json()
                if response.status_code not in _RETRY_STATUS or attempt == retries:
                    raise UserError(
                        f"{method} {url} failed with HTTP {response.status_code}: "
                        f"{_error_detail(response)}"
                    )
            time.sleep(min(_MAX_BACKOFF_S, 0.5 * 2**attempt) * (0.5 + random.random() / 2))
        raise AssertionError("unreachable")


def _completion_text(payload: dict) -> tuple[str, str]:
    choice = payload["choices"][0]
    return choice.get("text") or "", choice.get("finish_reason") or "stop"


def _chat_text(payload: dict) -> tuple[str, str]:
    choice = payload["choices"][0]
    return (choice.get("message") or {}).get("content") or "", choice.get("finish_reason") or "stop"


def _error_detail(response: Any) -> str:
    try:
        detail = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(detail, dict):
        detail = detail.get("detail") or detail.get("error") or detail
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    return str(detail)[:300]


def added_bos_text(tokenizer: Any) -> str:
    """The BOS token text `tokenizer` prepends on its own, or "" when it prepends none."""
    ids = tokenizer("a").input_ids
    added = bool(ids) and ids[0] == tokenizer.bos_token_id
    return tokenizer.bos_token if added and tokenizer.bos_token else ""


def load_local_tokenizer(source: Any) -> Any:
    """A tokenizer object, or None when `source` names none available here (then the prompt
    text is sent unchanged and stop tokens are left to the server's own eos). Only local
    files are read: the sweep has already fetched the checkpoint's tokenizer to render, and a
    hosted model's name must not trigger a download."""
    if source is None or not isinstance(source, str | os.PathLike):
        return source
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        log.warning("no tokenizer for %s (%s): prompts are sent as rendered", source, err)
        return None
