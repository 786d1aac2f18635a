"""Prefix-sharing generation: prefill every distinct prompt prefix once, decode at the leaves.

A sweep's prompts share long prefixes by construction (nested demo draws, `contexts: shared`),
so the floor on prefill work is the size of the prompts' token trie ("trie tokens"), not the
sum of prompt lengths. `generate_shared` walks a compressed trie (radix tree) of the prompts
depth-first: a node's key/value cache is computed once, from its parent's cache, and handed to
its children. Sibling prompt endings are prefilled together (right-padded, so padding sits
after every real token and the causal mask alone keeps rows apart); finished prefills wait in
a pool until a full batch can be decoded together (re-packed left-padded, as `generate` pads,
so cache index and position differ by a per-row constant and sliding-window masks stay
right). A branch's cache is dropped as soon as its last child has it, and batches are sized
to a key/value memory budget.

What is identical to the naive path (each prompt prefilled from scratch, then greedy
decoding): every token attends to exactly the same earlier tokens at exactly the same
positions with the same weights, so both compute the same function of the same inputs. What
is NOT bit-identical: floating-point results of matmuls and attention reductions depend on the
shapes they run at (a prefix run as its own chunk, a batch of siblings, a one-row matmul takes
a different kernel than a many-row one), so logits agree to rounding (a few 1e-7 in
float32 on a small random model) rather than to the last bit. Greedy answers are therefore identical
unless two candidate tokens' logits tie to within that rounding, which is exactly the caveat
between any two batch sizes of the naive path itself. In float64 such ties do not occur in
practice, and the tests assert identical answers there for all four tiny-model families; in
float32 the bench compares the answers and reports any difference.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stagesweep.evaluate.backends.base import (
    Generation,
    GenerationConfig,
    GenerationRequest,
    Score,
    ScoreRequest,
)

if TYPE_CHECKING:
    import torch

# Tokens per prefill forward pass (rows x columns); long segments are run in chunks of this.
DEFAULT_CHUNK_TOKENS = 2048
# Padding a batch of sibling prefills may add, as a share of their real tokens. Siblings of
# unlike length are prefilled in separate forwards instead: on the study's per-query draws the
# siblings' lengths differ by whole demos, and padding them together prefilled 1.17 x the trie.
MAX_PADDING_SHARE = 0.01


def trie_order(requests: Sequence[GenerationRequest]) -> list[GenerationRequest]:
    """Requests in depth-first order of their prompts' token trie.

    Lexicographic order of the token-id sequences is a depth-first (pre-order) walk of the
    trie: a prompt comes right before its extensions, and all prompts under one prefix are
    contiguous, so a server's prefix cache sees each shared prefix in one run.
    """
    return sorted(requests, key=lambda r: r.prompt_ids)


def trie_tokens(seqs: Sequence[Sequence[int]]) -> int:
    """Number of distinct prefixes of `seqs`: the tokens a perfect prefix cache would prefill.

    In sorted order a sequence's longest common prefix with any earlier one is the one with its
    immediate predecessor, so each sequence adds its length minus that overlap.
    """
    total, prev = 0, ()
    for seq in sorted({tuple(s) for s in seqs}):
        total += len(seq) - _common_prefix(prev, seq)
        prev = seq
    return total


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Node:
    """A radix-tree node: the tokens after its parent's end, the prompts ending here."""

    start: int  # prompt tokens before this node's segment
    tokens: tuple[int, ...]
    keys: list[str] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def build_trie(requests: Sequence[GenerationRequest]) -> _Node:
    """The compressed token trie of the prompts; the root has no tokens.

    Built from the sorted distinct prompts and their adjacent common-prefix lengths: a range
    of sorted prompts shares exactly the minimum adjacent overlap inside it.
    """
    keys_by_prompt: dict[tuple[int, ...], list[str]] = {}
    for req in requests:
        keys_by_prompt.setdefault(tuple(req.prompt_ids), []).append(req.key)
    seqs = sorted(keys_by_prompt)
    lcp = [0] + [_common_prefix(seqs[i - 1], seqs[i]) for i in range(1, len(seqs))]
    root = _Node(0, ())

    # (parent, lo, hi): the prompts seqs[lo:hi] hang below `parent`, each longer than it.
    stack = [(root, 0, len(seqs))]
    while stack:
        parent, lo, hi = stack.pop()
        i = lo
        while i < hi:
            # the run of prompts that share at least one token after the parent's end
            j = i + 1
            while j < hi and lcp[j] > parent.end:
                j += 1
            depth = min([len(seqs[i]), *lcp[i + 1 : j]])
            node = _Node(parent.end, seqs[i][parent.end : depth])
            parent.children.append(node)
            first = i
            if len(seqs[i]) == depth:
                node.keys = keys_by_prompt[seqs[i]]
                first += 1
            if first < j:
                stack.append((node, first, j))
            i = j
    return root


@dataclass
class _KV:
    """Per-layer key/value tensors of shape (batch, kv_heads, tokens, head_dim)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in self.layers)


@dataclass
class _Leaf:
    """A prompt whose prefill is done: row `row` of `kv` holds its `length` tokens."""

    kv: _KV
    row: int
    length: int
    logits: torch.Tensor  # next-token logits after the prompt's last token
    keys: list[str]


def _decode_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A cache layer with room for the answer, so a decoding step writes one column
        instead of re-concatenating the whole cache (which `DynamicLayer` does every step)."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self.buffers = (keys, values)
            self.length = length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = self.buffers
            end = self.length + key_states.shape[-2]
            keys[:, :, self.length : end] = key_states
            values[:, :, self.length : end] = value_states
            self.rewind(end)
            return self.keys, self.values

        def rewind(self, length: int) -> None:
            """Keep the first `length` columns: later ones are free for the next write."""
            keys, values = self.buffers
            self.length = length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    return PreallocatedLayer


class _Runner:
    """Holds the model, the settings and the bookkeeping of one `generate_shared` call."""

    def __init__(self, model: Any, config: GenerationConfig, pad_token_id: int,
                 max_kv_gb: float | None, chunk_tokens: int,
                 decode: Callable[[list[int]], str] | None, stats: dict, *,
                 continuations: dict[str, tuple[tuple[int, ...], ...]] | None = None,
                 generates: bool = True) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.config = config
        self.pad = pad_token_id
        self.chunk_tokens = chunk_tokens
        self.decode = decode
        self.stats = stats
        self.device = next(model.parameters()).device
        self.budget = None if max_kv_gb is None else int(max_kv_gb * 2**30)
        self.bytes_per_token = kv_bytes_per_token(model)
        self.rows = max(1, config.batch_size)
        self.held = 0  # bytes of caches kept for branches still to visit
        # Prefilled prompts waiting to be decoded together: siblings in the trie are often
        # few (prompts split again inside the target turn), a decoding batch should be full.
        self.pending: list[_Leaf] = []
        self.cache_kw = _cache_keyword(model)
        self.layer_class = _decode_layer_class()
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.warpers = _sampling_warpers(config)
        # request key -> token ids to score after its prompt; `generates` False scores only
        self.continuations = continuations or {}
        self.generates = generates

    def _pending_bytes(self) -> int:
        return sum(leaf.length for leaf in self.pending) * self.bytes_per_token

    def _note_live(self, nbytes: int) -> None:
        live = self.held + self._pending_bytes() + nbytes
        self.stats["peak_kv_bytes"] = max(self.stats["peak_kv_bytes"], live)

    def _forward(self, ids: torch.Tensor, cache: Any, *, keep: torch.Tensor | int,
                 position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=True, logits_to_keep=keep, **{self.cache_kw: cache})
        self.stats["forward_calls"] += 1
        return out.logits

    def prefill(self, parent: _KV | None, segments: list[tuple[int, ...]]
                ) -> tuple[_KV, torch.Tensor]:
        """Run `segments` after the (1-row) parent cache, one row each, right-padded.

        Returns the batched cache (rows padded to the longest segment) and each row's logits
        after its last real token.
        """
        from transformers import DynamicCache

        torch = self.torch
        rows, width = len(segments), max(len(s) for s in segments)
        ids = torch.full((rows, width), self.pad, dtype=torch.long, device=self.device)
        for r, seg in enumerate(segments):
            ids[r, : len(seg)] = torch.tensor(seg, dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in segments], device=self.device)
        # A config-less DynamicCache keeps every layer in full, sliding-window layers included:
        # the model's masks still apply the window, and a full cache can be branched and
        # re-packed, which a window-trimmed one cannot. Expanding the parent is a view; the
        # cache's first concatenation makes each row's own copy.
        cache = DynamicCache()
        if parent is not None:
            cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1),
                                                  v.expand(rows, -1, -1, -1))
                                                 for k, v in parent.layers])
        start = 0 if parent is None else parent.layers[0][0].shape[-2]
        self._note_live((start + width) * rows * self.bytes_per_token)
        picked: list[torch.Tensor | None] = [None] * rows
        step = max(1, self.chunk_tokens // rows)
        for a in range(0, width, step):
            b = min(width, a + step)
            # only the rows whose last real token is in this chunk need the output head
            here = [r for r in range(rows) if a <= int(last[r]) < b]
            keep = torch.unique(last[here]) - a
            chunk_logits = self._forward(ids[:, a:b], cache, keep=keep)
            for r in here:
                picked[r] = chunk_logits[r, int(torch.searchsorted(keep, last[r] - a))]
        self.stats["prefilled_tokens"] += rows * width
        self.stats["padding_tokens"] += rows * width - sum(len(s) for s in segments)
        return _KV([(layer.keys, layer.values) for layer in cache.layers]), torch.stack(picked)

    def flush(self, everything: bool = False) -> Iterator[Generation]:
        """Decode full batches of pending prompts (all of them with `everything`)."""
        while len(self.pending) >= self.rows or (everything and self.pending):
            batch, self.pending = self.pending[: self.rows], self.pending[self.rows :]
            yield from self.finish_rows(batch)

    def finish_rows(self, leaves: list[_Leaf]) -> Iterator[Generation | Score]:
        """Prefilled prompts are decoded (`decode_rows`, which scores the requests'
        continuations first on the same packed cache), or only scored."""
        if self.generates:
            return self.decode_rows(leaves)
        return self.score_rows(leaves)

    def score_rows(self, leaves: list[_Leaf]) -> Iterator[Score]:
        """Judge-free: the openings' scores alone (no packing when every opening is one
        token: the prompts' last logits score them)."""
        room = self.score_room(leaves)
        cache, mask, width = self.packed_cache(leaves, room) if room else (None, None, 0)
        scores = self.score_packed(leaves, cache, mask, width)
        return (Score(key, scores[key]) for leaf in leaves for key in leaf.keys)

    def _wanted(self, leaf: _Leaf) -> list[tuple[int, ...]]:
        """The distinct continuations of a prompt's keys (a shared one is run once)."""
        return list(dict.fromkeys(c for key in leaf.keys for c in self.continuations.get(key, ())))

    def score_room(self, rows: list[_Leaf]) -> int:
        """Cache columns the scoring forwards need: every continuation token but the last."""
        return max((len(c) - 1 for leaf in rows for c in self._wanted(leaf)), default=0)

    def score_packed(self, rows: list[_Leaf], cache: Any, mask: torch.Tensor | None,
                     width: int) -> dict[str, tuple[float, ...]]:
        """Each scored key's continuation log-probabilities, teacher-forced on the rows'
        packed cache (with `score_room` free columns): a continuation's first token is scored
        from the prompt's last logits, its later tokens by feeding it one token a step (the
        j-th continuation of every row together), as decoding does: one-token steps read the
        cache once per key/value head, where a many-token forward repeats it per query head.
        The columns are then released, so the same cache serves the decoding that follows
        and no prompt is copied once per continuation."""
        torch = self.torch
        wanted = [self._wanted(leaf) for leaf in rows]
        first = log_probs(torch.stack([leaf.logits for leaf in rows]))
        totals: list[dict[tuple[int, ...], float]] = [{} for _ in rows]
        lengths = torch.tensor([leaf.length for leaf in rows], device=self.device)
        for j in range(max(map(len, wanted), default=0)):
            column = [conts[j] if j < len(conts) else () for conts in wanted]
            for r, c in enumerate(column):
                if c:
                    totals[r][c] = float(first[r, c[0]])
            for t in range(max(map(len, column)) - 1):
                fed = [c[t] if t + 1 < len(c) else self.pad for c in column]
                logits = self._forward(
                    torch.tensor(fed, device=self.device)[:, None], cache, keep=1,
                    position_ids=(lengths + t)[:, None],
                    attention_mask=mask[:, : width + t + 1])[:, -1]
                logp = log_probs(logits)
                for r, c in enumerate(column):
                    if t + 1 < len(c):
                        totals[r][c] += float(logp[r, c[t + 1]])
                self.stats["prefilled_tokens"] += len(rows)
            for layer in cache.layers if cache is not None else ():
                layer.rewind(width)
        return {key: tuple(totals[r][c] for c in self.continuations[key])
                for r, leaf in enumerate(rows) for key in leaf.keys if key in self.continuations}

    def packed_cache(self, rows: list[_Leaf], extra: int) -> tuple[Any, torch.Tensor, int]:
        """The rows' caches re-packed left-padded with room for `extra` new tokens, as
        `generate` pads a batch: each row's tokens are contiguous up to the new ones, so cache
        index and position differ by a per-row constant and sliding-window masks (defined on
        cache indices) stay exact. Returns (cache, attention mask, width)."""
        from transformers.cache_utils import Cache

        torch = self.torch
        lengths = torch.tensor([leaf.length for leaf in rows], device=self.device)
        width = int(lengths.max())
        layers = []
        for i, (k0, v0) in enumerate(rows[0].kv.layers):
            shape = (len(rows), k0.shape[1], width + extra, k0.shape[-1])
            keys, values = k0.new_zeros(shape), v0.new_zeros(shape)
            for r, leaf in enumerate(rows):
                k, v = leaf.kv.layers[i]
                keys[r, :, width - leaf.length : width] = k[leaf.row, :, : leaf.length]
                values[r, :, width - leaf.length : width] = v[leaf.row, :, : leaf.length]
            layers.append(self.layer_class(keys, values, width))
        self._note_live(len(rows) * (width + extra) * self.bytes_per_token)
        mask = (torch.arange(width + extra, device=self.device)[None, :]
                >= (width - lengths)[:, None]).long()
        return Cache(layers=layers), mask, width

    def decode_rows(self, leaves: list[_Leaf]) -> Iterator[Generation]:
        """Greedy (or sampled) decoding of prefilled prompts, in one batch; the requests'
        continuations are scored first on the same cache."""
        torch, config = self.torch, self.config
        samples = config.num_samples if config.temperature > 0 else 1
        rows = [leaf for leaf in leaves for _ in range(samples)]
        lengths = torch.tensor([leaf.length for leaf in rows], device=self.device)
        cache, mask, width = self.packed_cache(
            rows, max(config.max_new_tokens, self.score_room(rows)))
        scores = self.score_packed(rows, cache, mask, width) if self.continuations else {}
        del leaves
        logits = torch.stack([leaf.logits for leaf in rows])
        position = lengths.clone()

        out = torch.full((len(rows), config.max_new_tokens), self.pad, dtype=torch.long)
        stopped = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        n_new = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        stop_ids = torch.tensor(list(config.stop_token_ids), dtype=torch.long, device=self.device)
        for t in range(config.max_new_tokens):
            token = torch.where(stopped, self.pad, self._next_token(logits))
            out[:, t] = token.cpu()
            n_new += (~stopped).long()
            stopped |= torch.isin(token, stop_ids)
            if bool(stopped.all()) or t + 1 == config.max_new_tokens:
                break
            logits = self._forward(token[:, None], cache, keep=1,
                                   position_ids=position[:, None],
                                   attention_mask=mask[:, : width + t + 1])[:, -1]
            position += 1
            self.stats["decode_steps"] += 1

        for r, leaf in enumerate(rows):
            ids = out[r, : int(n_new[r])].tolist()
            reason = "stop" if ids and ids[-1] in config.stop_token_ids else "length"
            text = self.decode(ids) if self.decode is not None else ""
            # greedy rows stand for every sample; sampled rows come `samples` per prompt in a run
            numbers = range(config.num_samples) if samples == 1 else [r % samples]
            for key in leaf.keys:
                for sample in numbers:
                    yield Generation(key, text, tuple(ids), reason, sample=sample,
                                     logprobs=scores.get(key))

    def _next_token(self, logits: torch.Tensor) -> torch.Tensor:
        if self.warpers is None:
            return logits.argmax(-1)
        scores = self.warpers(None, logits.float())
        probs = self.torch.softmax(scores, -1)
        return self.torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def group_size(self, context: int, widths: list[int]) -> int:
        """How many of the next sibling rows (`widths` ascending) to prefill together: as many
        as fit next to the caches already alive, and no more than pad by MAX_PADDING_SHARE."""
        fit = self.rows
        if self.budget is not None:
            per_row = (context + max(widths)) * self.bytes_per_token
            fit = max(1, min(fit, int((self.budget - self.held - self._pending_bytes())
                                      // per_row)))
        n, real = 1, widths[0]
        while n < min(fit, len(widths)):
            real += widths[n]
            if (n + 1) * widths[n] - real > MAX_PADDING_SHARE * real:
                break
            n += 1
        return n

    def over_budget(self, extra: int) -> bool:
        return self.budget is not None and (
            self.held + self._pending_bytes() + extra > self.budget)

    def visit(self, node: _Node, state: list) -> Iterator[Generation]:
        """Generate every prompt under `node`; `state` is [cache ending at node.end, logits].

        The caller hands the cache over in a list that this method empties, so the last
        reference is local here and the cache is freed as soon as this branch is done with it.
        """
        kv, logits = state
        state.clear()
        if node.keys:
            self.pending.append(_Leaf(kv, 0, node.end, logits[0], node.keys))
            yield from self.flush()
        del logits
        leaves = sorted((c for c in node.children if not c.children), key=lambda c: len(c.tokens))
        inner = [c for c in node.children if c.children]
        if kv is not None:
            self.held += kv.nbytes
        i = 0
        while i < len(leaves):
            n = self.group_size(node.end, [len(c.tokens) for c in leaves[i:]])
            group, i = leaves[i : i + n], i + n
            if self.over_budget(len(group) * (node.end + len(group[-1].tokens))
                                * self.bytes_per_token):
                yield from self.flush(everything=True)
            batch, last = self.prefill(kv, [c.tokens for c in group])
            self.pending += [_Leaf(batch, r, c.end, last[r], c.keys)
                             for r, c in enumerate(group)]
            del batch, last
            yield from self.flush()
        for j, child in enumerate(inner):
            branch = list(self.prefill(kv, [child.tokens]))
            if j == len(inner) - 1 and kv is not None:
                # the last branch: this node's cache is no longer needed, drop it first
                self.held -= kv.nbytes
                kv = None
            yield from self.visit(child, branch)
        if kv is not None:
            self.held -= kv.nbytes


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary in at least float32 (half-precision sums of many small
    probabilities lose the tail)."""
    import torch

    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, -1)


def score_shared(
    model: Any,
    requests: Sequence[ScoreRequest],
    config: GenerationConfig,
    *,
    pad_token_id: int,
    max_kv_gb: float | None = None,
    stats: dict | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Iterator[Score]:
    """Yield one Score per request, prefilling each shared prompt prefix once (the trie walk
    of `generate_shared`); each prompt's continuations are then run as a batch on its cache.
    `config.batch_size` is the most prompts scored together."""
    import torch

    run_stats = _run_stats(requests, stats)
    if any(not r.prompt_ids or not r.continuations for r in requests):
        raise ValueError("every score request needs a non-empty prompt and continuations")
    _check_continuations(requests)
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"prefix sharing cannot run this model exactly: {reason}")
    runner = _Runner(model, config, pad_token_id, max_kv_gb, chunk_tokens, None, run_stats,
                     continuations={r.key: r.continuations for r in requests}, generates=False)
    prompts = [GenerationRequest(r.key, r.prompt_ids, "") for r in requests]
    with torch.inference_mode():
        yield from runner.visit(build_trie(prompts), [None, None])
        yield from runner.flush(everything=True)


def _check_continuations(requests: Sequence[GenerationRequest | ScoreRequest]) -> None:
    if any(not c for r in requests for c in r.continuations):
        raise ValueError("a continuation to score is empty")


# Attention kinds whose masks depend only on token distances, which the re-packing keeps;
# chunked attention (Llama 4) and recurrent/linear layers keep other state and are refused.
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def unsupported_reason(model: Any) -> str | None:
    """Why `generate_shared` cannot run `model` exactly, or None when it can."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    kinds = set(getattr(config, "layer_types", None) or ()) - SUPPORTED_LAYER_TYPES
    if kinds:
        return f"layer types {sorted(kinds)} are not supported (only full and sliding attention)"
    return None


def kv_bytes_per_token(model: Any) -> int:
    """Key/value bytes one token occupies across all layers (batch of one)."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype_size = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * kv_heads * head_dim * dtype_size


def _cache_keyword(model: Any) -> str:
    """transformers 5 renamed the forward argument `past_key_values` to `cache`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sampling_warpers(config: GenerationConfig) -> Any:
    if config.temperature <= 0:
        return None
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)])
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


def new_stats() -> dict:
    return {"prompt_tokens": 0, "trie_tokens": 0, "prefilled_tokens": 0, "padding_tokens": 0,
            "peak_kv_bytes": 0, "forward_calls": 0, "decode_steps": 0}


def _run_stats(requests: Sequence[Any], stats: dict | None) -> dict:
    """Fresh counters with the requests' prompt and trie tokens, kept in the caller's `stats`
    dict when one is given (the bench reads it after the run)."""
    run_stats = new_stats()
    run_stats["prompt_tokens"] = sum(len(r.prompt_ids) for r in requests)
    run_stats["trie_tokens"] = trie_tokens([r.prompt_ids for r in requests])
    if stats is None:
        return run_stats
    stats.update(run_stats)
    return stats


def generate_shared(
    model: Any,
    requests: Sequence[GenerationRequest],
    config: GenerationConfig,
    *,
    pad_token_id: int,
    max_kv_gb: float | None = None,
    stats: dict | None = None,
    decode: Callable[[list[int]], str] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Iterator[Generation]:
    """Yield one Generation per request (and sample), computing each shared prefix once.

    `model` is a loaded causal LM in eval mode; `decode` turns generated ids into
    `Generation.text` (left empty without it). `token_ids` end with the stop token when
    `finish_reason == "stop"`, as `generate` returns them (without its trailing padding).
    `max_kv_gb` bounds the key/value caches alive at once (a single prompt larger than the
    budget still runs, one row at a time); `config.batch_size` is the most rows per forward
    pass. `stats`, if given, is filled with token counts (prompt, trie, prefilled, padding),
    forward passes and the peak cache bytes. A request's `continuations` are scored on its
    prompt's cache before it is decoded (`Generation.logprobs`): no second trie walk.
    """
    import torch

    run_stats = _run_stats(requests, stats)
    if any(not r.prompt_ids for r in requests):
        raise ValueError("every request needs a non-empty prompt_ids")
    _check_continuations(requests)
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f"prefix sharing cannot run this model exactly: {reason}; generate "
                         "without it (--no-prefix-sharing)")
    runner = _Runner(model, config, pad_token_id, max_kv_gb, chunk_tokens, decode, run_stats,
                     continuations={r.key: r.continuations for r in requests if r.continuations})
    with torch.inference_mode():
        yield from runner.visit(build_trie(requests), [None, None])
        yield from runner.flush(everything=True)


def generate_unshared(
    model: Any,
    requests: Sequence[GenerationRequest],
    config: GenerationConfig,
    *,
    pad_token_id: int,
    decode: Callable[[list[int]], str] | None = None,
) -> Iterator[Generation]:
    """The reference path: each prompt alone through `model.generate` with greedy decoding.

    Uses the model's own default cache (window-trimmed for sliding layers), so it is exactly
    what an unoptimized transformers user gets; `generate_shared` is checked against it.
    """
    import torch
    from transformers import GenerationConfig as HFGenerationConfig

    if config.temperature > 0:
        raise ValueError("the reference path is greedy only (temperature 0)")
    hf_config = HFGenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=config.max_new_tokens,
        eos_token_id=list(config.stop_token_ids) or None, pad_token_id=pad_token_id,
    )
    device = next(model.parameters()).device
    with torch.inference_mode():
        for req in requests:
            ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 generation_config=hf_config)
            new = out[0, ids.shape[1]:].tolist()
            reason = "stop" if new and new[-1] in config.stop_token_ids else "length"
            text = decode(new) if decode is not None else ""
            for sample in range(config.num_samples):
                yield Generation(req.key, text, tuple(new), reason, sample=sample)
