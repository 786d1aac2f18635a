"""Tiny checkpoints of real architectures, built locally from shipped text.

Tests, the tiny recipes and the demo need a model that loads with `from_pretrained`, chats
with its family's template and generates on a CPU in seconds, without downloading anything.
`build_tiny_model` makes one with random (seeded) weights and a byte-level BPE tokenizer
trained on `stagesweep/data/corpus.txt`; `ensure_tiny_model` caches one per architecture so
that many test processes share a single build.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagesweep.chat_templates import FAMILIES, ChatFamily

# Bump when the build changes in a way the corpus hash does not capture (configs, tokens).
BUILD_FORMAT = "4"
MANIFEST = "stagesweep_tiny.json"
DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "corpus.txt"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """Shape shared by every architecture at one size."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


SIZES: dict[str, Size] = {
    # Seconds to build, milliseconds per token: for tests.
    "tiny": Size(2048, 64, 128, 2, 4, 2, 16),
    # ~10-20M parameters: for benchmarks where compute, not Python overhead, must dominate.
    "small": Size(4096, 384, 1024, 8, 6, 2, 64),
}
# Long enough for sweeps that pack dozens of demonstrations into one prompt.
MAX_POSITIONS = 8192


@dataclass(frozen=True)
class Arch:
    """One architecture: its chat family and how to make its transformers config."""

    name: str
    family: str
    make_config: Callable[[Size, dict[str, int]], Any]


def _olmo3(size: Size, ids: dict[str, int]) -> Any:
    from transformers import Olmo3Config

    return Olmo3Config(**_common(size, ids), sliding_window=MAX_POSITIONS)


def _llama(size: Size, ids: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(size, ids), head_dim=size.head_dim)


def _gemma(size: Size, ids: dict[str, int]) -> Any:
    from transformers import Gemma3TextConfig

    # Gemma 3 interleaves sliding and full attention; a small window keeps both paths in use.
    return Gemma3TextConfig(
        **_common(size, ids),
        head_dim=size.head_dim,
        sliding_window=512,
        query_pre_attn_scalar=size.head_dim,
    )


def _gemma4(size: Size, ids: dict[str, int]) -> Any:
    from transformers import Gemma4TextConfig

    # Gemma 4's text decoder, its sliding and full attention layers both in use, without the
    # per-layer input embeddings of the small on-device variants.
    return Gemma4TextConfig(
        **_common(size, ids),
        head_dim=size.head_dim,
        sliding_window=512,
        hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"] * (size.num_hidden_layers // 2),
    )


def _gpt_oss(size: Size, ids: dict[str, int]) -> Any:
    from transformers import GptOssConfig

    # A small mixture of experts in plain float32 (no mxfp4 quantization_config), so it runs
    # on a CPU; the router and expert layout are GPT-OSS's own. Each of the two active experts
    # is half as wide, so per-token compute matches the dense architectures of the same size.
    return GptOssConfig(
        **{**_common(size, ids), "intermediate_size": size.intermediate_size // 2},
        head_dim=size.head_dim,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=128,
        # GPT-OSS's YaRN settings, with the factor scaled to this context so they agree.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": MAX_POSITIONS / 4096,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        layer_types=["sliding_attention", "full_attention"] * (size.num_hidden_layers // 2),
    )


def _common(size: Size, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "vocab_size": size.vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_hidden_layers,
        "num_attention_heads": size.num_attention_heads,
        "num_key_value_heads": size.num_key_value_heads,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": True,
        "pad_token_id": ids["pad"],
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids["eos"],
    }


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("olmo3", "olmo3", _olmo3),
        Arch("llama", "llama3", _llama),
        Arch("gemma", "gemma", _gemma),
        Arch("gemma4", "gemma4", _gemma4),
        Arch("gpt-oss", "harmony", _gpt_oss),
    )
}


def build_version() -> str:
    """Identifies what a build contains, so caches built from older code are rebuilt."""
    digest = hashlib.sha256(CORPUS.read_bytes()).hexdigest()[:12]
    return f"{BUILD_FORMAT}-{digest}"


def _arch(name: str) -> Arch:
    from stagesweep.cli import UserError

    if name not in ARCHS:
        raise UserError(f"unknown --arch {name!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def _size(name: str) -> Size:
    from stagesweep.cli import UserError

    if name not in SIZES:
        raise UserError(f"unknown --size {name!r}; choose one of {', '.join(SIZES)}")
    return SIZES[name]


def build_tokenizer(family: ChatFamily, vocab_size: int) -> Any:
    """A byte-level BPE trained on the shipped corpus, carrying the family's chat template.

    The family's special tokens are trained in first so they get the lowest ids, and the
    vocabulary is padded to exactly `vocab_size` ids by the trainer's target.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(family.plain_tokens),
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    if family.bos is not None:
        # Llama 3 and Gemma tokenizers prepend bos themselves; chat templates render it too and
        # `apply_chat_template` then tokenizes without special tokens, as with the originals.
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.end_of_turn,
        pad_token=family.pad,
        chat_template=family.template,
        model_max_length=MAX_POSITIONS,
    )
    if family.plain_tokens:
        fast.add_tokens(list(family.plain_tokens), special_tokens=False)
    return fast


def build_tiny_model(arch: str, out: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight checkpoint of `arch` with its family's tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec, shape = _arch(arch), _size(size)
    family = FAMILIES[spec.family]
    out = Path(out)
    tokenizer = build_tokenizer(family, shape.vocab_size)
    ids = {
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.convert_tokens_to_ids(family.end_of_turn),
    }
    if family.bos is not None:
        ids["bos"] = tokenizer.bos_token_id
    stop_ids = [ids["eos"], *tokenizer.convert_tokens_to_ids(list(family.extra_stop))]
    config = spec.make_config(shape, ids)
    config.eos_token_id = stop_ids
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"),
        eos_token_id=stop_ids,
        pad_token_id=ids["pad"],
        do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 records its own class name, which 4.x (still common in vLLM images) cannot
    # resolve; the 4.x name loads in both.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    manifest = {
        "arch": arch,
        "size": size,
        "seed": seed,
        "chat_family": family.name,
        "reasoning_family": family.reasoning_family,
        "end_of_turn": family.end_of_turn,
        "version": build_version(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def read_tiny_manifest(path: Path) -> dict | None:
    """The build record of a tiny checkpoint (arch, reasoning_family, version), or None."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_current(path: Path, arch: str, size: str) -> bool:
    manifest = read_tiny_manifest(path)
    return (
        manifest is not None
        and manifest.get("arch") == arch
        and manifest.get("size", "tiny") == size
        and manifest.get("version") == build_version()
        and (path / "model.safetensors").exists()
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    import fcntl

    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_model(arch: str, cache: Path | None = None, *, size: str = "tiny") -> Path:
    """Return a cached tiny checkpoint of `arch`, building it on first use.

    Safe under concurrent test processes: the build happens under a file lock into a
    temporary sibling directory that is renamed into place, so a reader sees either no
    checkpoint or a complete one. A cache built from another corpus or build format is rebuilt.
    """
    _arch(arch)
    default = arch if size == "tiny" else f"{arch}-{size}"
    cache = Path(cache) if cache is not None else REPO_ROOT / ".cache" / "tiny" / default
    if _is_current(cache, arch, size):
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with _locked(cache.parent / f".{cache.name}.lock"):
        if _is_current(cache, arch, size):
            return cache
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        try:
            build_tiny_model(arch, tmp, size=size)
            if cache.exists():
                stale = cache.with_name(f"{tmp.name}.stale")
                os.replace(cache, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny-model",
        help="build a tiny random-weight checkpoint of a real architecture (no download)",
        description="Build a small checkpoint of a real architecture with random weights, a "
        "tokenizer trained on shipped text and its family's chat template, to try the "
        "pipeline on a CPU.",
    )
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS), help="architecture")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=sorted(SIZES),
        help="tiny: 2 layers, hidden 64 (tests); small: 8 layers, hidden 384 (benchmarks)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.set_defaults(func=_handle)


def _handle(args: argparse.Namespace) -> int:
    from stagesweep.cli import UserError

    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"--out {args.out} exists and is not empty; choose a new directory")
    path = build_tiny_model(args.arch, args.out, seed=args.seed, size=args.size)
    manifest = read_tiny_manifest(path) or {}
    print(
        f"wrote {args.arch} ({args.size}, reasoning family {manifest.get('reasoning_family')})"
        f" to {path}"
    )
    return 0
