"""In-process Hugging Face backend: batched, left-padded generation with transformers.

Prompts arrive as token ids (rendered by the sweep), are sorted by length so a batch pads
little, and are generated greedily unless the config samples. With `prefix_sharing` and greedy
decoding the work goes to `stagesweep.evaluate.prefix_sharing` (each shared prefix is
prefilled once); the plain path below stays as the reference it must match.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence

from stagesweep.cli import UserError
from stagesweep.evaluate.backends.base import (
    Generation,
    GenerationConfig,
    GenerationRequest,
    Score,
    ScoreRequest,
    answer_text,
    batched,
)


class HFBackend:
    name = "hf"

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False,
                 prefix_sharing: bool = True, max_kv_gb: float | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prefix_sharing = prefix_sharing
        self.max_kv_gb = max_kv_gb
        self.tokenizer = AutoTokenizer.from_pretrained(model_path,
                                                       trust_remote_code=trust_remote_code)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, trust_remote_code=trust_remote_code,
                # Pickled .bin weights can run code on load; refuse them unless asked.
                use_safetensors=None if allow_pickle else True,
            ).to(self.device).eval()
        except OSError as err:
            hint = "" if allow_pickle else " (only safetensors weights are loaded unless " \
                "--allow-pickle)"
            raise UserError(f"cannot load model weights from {model_path!r}: {err}{hint}") \
                from None
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.stats: dict = {}
        from stagesweep.evaluate.prefix_sharing import unsupported_reason

        # why this model cannot share prefixes exactly (None: it can), said once at load
        self.unshareable = unsupported_reason(self.model)
        if prefix_sharing and self.unshareable:
            warnings.warn(f"prefix sharing off for this model: {self.unshareable}", stacklevel=2)

    def _stop_ids(self, config: GenerationConfig) -> list[int] | None:
        if config.stop_token_ids:
            return list(config.stop_token_ids)
        eos = self.model.generation_config.eos_token_id
        return None if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]

    def decode(self, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
        return answer_text(self.tokenizer, ids, [*stop_ids, self.pad_token_id])

    def scores_while_generating(self, config: GenerationConfig) -> bool:
        """True when `generate` runs `config` on the prefix-sharing path (greedy decoding on a
        model it can run exactly), the path that scores continuations on its prefill."""
        greedy = config.temperature == 0 and config.num_samples == 1
        return self.prefix_sharing and greedy and self.unshareable is None

    def generate(self, requests: Sequence[GenerationRequest], config: GenerationConfig,
                 progress: Callable[[int], None] | None = None) -> Iterator[Generation]:
        stop_ids = self._stop_ids(config) or []
        if not self.scores_while_generating(config):
            if any(r.continuations for r in requests):
                raise ValueError("continuations are scored while generating only with prefix "
                                 "sharing (see scores_while_generating)")
            yield from self._generate_plain(requests, config, stop_ids, progress)
            return
        from stagesweep.evaluate.prefix_sharing import generate_shared

        shared = generate_shared(
            self.model, requests,
            # the plain path stops on the checkpoint's end-of-turn when the config names no
            # stop ids; the shared path must stop on the same ids
            dataclasses.replace(config, stop_token_ids=tuple(stop_ids)),
            pad_token_id=self.pad_token_id, max_kv_gb=self.max_kv_gb,
            stats=self.stats, decode=lambda ids: self.decode(ids, stop_ids),
        )
        for gen in shared:
            if progress:
                progress(1)
            yield gen

    def _generate_plain(self, requests, config, stop_ids, progress) -> Iterator[Generation]:
        import torch

        ordered = sorted(requests, key=lambda r: (len(r.prompt_ids), r.key))
        sample = config.temperature > 0
        for i, batch in enumerate(batched(ordered, config.batch_size)):
            enc = self.tokenizer.pad({"input_ids": [list(r.prompt_ids) for r in batch]},
                                     padding=True, return_tensors="pt", padding_side="left")
            # Seeded per batch: sampled answers repeat for the same requests and batch size.
            torch.manual_seed(config.seed + i)
            kwargs = {"temperature": config.temperature, "top_p": config.top_p} if sample else {}
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=enc["input_ids"].to(self.device),
                    attention_mask=enc["attention_mask"].to(self.device),
                    max_new_tokens=config.max_new_tokens, do_sample=sample,
                    num_return_sequences=config.num_samples, eos_token_id=stop_ids or None,
                    pad_token_id=self.pad_token_id, **kwargs,
                )
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            for j, ids in enumerate(new):
                request = batch[j // config.num_samples]
                ended = any(t in stop_ids for t in ids)
                if ended:  # cut at the first end-of-turn; the rest is padding
                    ids = ids[: next(k for k, t in enumerate(ids) if t in stop_ids) + 1]
                yield Generation(request.key, self.decode(ids, stop_ids), tuple(ids),
                                 "stop" if ended else "length", j % config.num_samples)
            if progress:
                progress(len(batch))

    def score(self, requests: Sequence[ScoreRequest], config: GenerationConfig,
              progress: Callable[[int], None] | None = None) -> Iterator[Score]:
        """Teacher-forced log-probabilities of each request's continuations; shared prompt
        prefixes are prefilled once with `prefix_sharing` (the plain path is the reference)."""
        if not self.prefix_sharing or self.unshareable:
            yield from self._score_plain(requests, config, progress)
            return
        from stagesweep.evaluate.prefix_sharing import score_shared

        for result in score_shared(self.model, requests, config, pad_token_id=self.pad_token_id,
                                   max_kv_gb=self.max_kv_gb, stats=self.stats):
            if progress:
                progress(1)
            yield result

    def _score_plain(self, requests, config, progress) -> Iterator[Score]:
        """Each prompt + continuation as one right-padded row (padding after every real token,
        so positions need no correction); only the continuation positions reach the head."""
        import torch

        from stagesweep.evaluate.prefix_sharing import log_probs

        rows = [(r, c) for r in requests for c in dict.fromkeys(r.continuations)]
        rows.sort(key=lambda row: (len(row[0].prompt_ids) + len(row[1]), row[0].key))
        values: dict[tuple[str, tuple[int, ...]], float] = {}
        left = {r.key: len(set(r.continuations)) for r in requests}
        for batch in batched(rows, config.batch_size):
            seqs = [list(r.prompt_ids) + list(c) for r, c in batch]
            enc = self.tokenizer.pad({"input_ids": seqs}, padding=True, return_tensors="pt",
                                     padding_side="right")
            # logits at position t predict token t + 1: a continuation's tokens are predicted
            # from the prompt's last position to the one before the sequence's end
            spans = [(len(r.prompt_ids) - 1, len(r.prompt_ids) + len(c) - 1) for r, c in batch]
            keep = torch.tensor(sorted({t for a, b in spans for t in range(a, b)}))
            where = {int(t): i for i, t in enumerate(keep)}
            with torch.inference_mode():
                logits = self.model(input_ids=enc["input_ids"].to(self.device),
                                    attention_mask=enc["attention_mask"].to(self.device),
                                    logits_to_keep=keep.to(self.device)).logits
                logp = log_probs(logits)
            for j, ((r, c), (a, b)) in enumerate(zip(batch, spans, strict=True)):
                values[(r.key, c)] = float(sum(logp[j, where[t], c[t - a]] for t in range(a, b)))
                left[r.key] -= 1
                if left[r.key] == 0:
                    if progress:
                        progress(1)
                    yield Score(r.key, tuple(values[(r.key, x)] for x in r.continuations))
                    for x in r.continuations:
                        values.pop((r.key, x), None)

    def close(self) -> None:
        import gc

        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

