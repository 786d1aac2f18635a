"""What every judge that runs a model shares: backend plumbing and verdicts.

A classifier judge is a prompt format plus a parser. The prompt is built as text, tokenized with
the judge's own tokenizer and sent through the same backends the sweep uses (`hf` in process,
`openai` for a judge served elsewhere), greedily, so a verdict is reproducible. Anything the
parser cannot read is `unparsed`; it is never mapped to a side.

Judged text goes into the prompt verbatim, as the classifiers' own pipelines send it: editing it
where it happens to look like a delimiter would change some answers (an `Answer:` opening) and
not others, a bias between the arms of the format design, and the classifiers were validated on
unedited text. Only the parser is protected: it reads the judge's own output, never the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from stagesweep.evaluate.judges.base import JudgeItem, Verdict, format_adopted

BACKENDS = ("hf", "openai", "vllm")


def verdict(item: JudgeItem, label: str, raw: str = "") -> Verdict:
    return Verdict(item.key, label, format_adopted(item.response, item.opening), raw)


class GenerativeJudge:
    """Base of the judges that generate a verdict with a model.

    Options (the sweep spec's `judge_options`): `model` (path or hub id; each judge has its
    published default), `backend` (`hf`, `vllm` or `openai`), `base_url` (for `openai`),
    `served_model` (the server's name for it, default: the first one it lists), `batch_size`,
    `max_new_tokens`, and the hf loading flags `dtype`, `device`, `trust_remote_code`,
    `allow_pickle`.
    """

    name: ClassVar[str]
    default_model: ClassVar[str | None] = None
    default_max_new_tokens: ClassVar[int] = 32

    def __init__(
        self,
        model: str | None = None,
        *,
        backend: str = "hf",
        base_url: str | None = None,
        served_model: str | None = None,
        batch_size: int = 8,
        max_new_tokens: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        concurrency: int = 8,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        from stagesweep.cli import UserError

        if backend not in BACKENDS:
            raise UserError(
                f"judge_options.backend {backend!r} is unknown; choose one of {BACKENDS}"
            )
        if backend == "openai" and not base_url:
            raise UserError(f"judge {self.name} with backend openai needs judge_options.base_url")
        self.model = model or self.default_model
        if not self.model:
            raise UserError(f"judge {self.name} needs judge_options.model (a path or hub id)")
        self.backend_name = backend
        self.base_url = base_url
        self.served_model = served_model
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens or self.default_max_new_tokens
        self.load_options = {
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
        }
        self.http_options = {"concurrency": concurrency, "api_key_env": api_key_env}
        self._backend: Any = None
        self._tokenizer: Any = None

    # -------------------------------------------------------------- what each judge defines

    def build_prompt(self, item: JudgeItem) -> str:
        """The full prompt text for one item, the judged text in it verbatim."""
        raise NotImplementedError

    @staticmethod
    def parse(text: str) -> str:
        """The label a verdict text means: complied, refused or unparsed."""
        raise NotImplementedError

    # -------------------------------------------------------------- shared plumbing

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model, trust_remote_code=self.load_options["trust_remote_code"]
            )
        return self._tokenizer

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from stagesweep.evaluate.backends.base import get_backend_class

            cls = get_backend_class(self.backend_name)
            if self.backend_name != "openai":  # in process: hf or vllm
                self._backend = cls(self.model, **self.load_options)
            else:
                self._backend = cls(
                    self.base_url,
                    model=self.served_model,
                    tokenizer=self.tokenizer,
                    **self.http_options,
                )
        return self._backend

    def bos_text(self) -> str:
        """The BOS the tokenizer would prepend on its own, spelled out: prompts are tokenized
        without added special tokens so that text sent to a server tokenizes the same."""
        from stagesweep.evaluate.backends.openai import added_bos_text

        return added_bos_text(self.tokenizer)

    def generation_config(self) -> Any:
        from stagesweep.evaluate.backends.base import GenerationConfig

        stops = [self.tokenizer.eos_token_id]
        try:
            from transformers import GenerationConfig as HFGenerationConfig

            eos = HFGenerationConfig.from_pretrained(self.model).eos_token_id
            stops += eos if isinstance(eos, list) else [eos]
        except OSError:
            pass  # no generation_config.json: the tokenizer's eos is the only stop
        stop_ids = tuple(dict.fromkeys(s for s in stops if s is not None))
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, stop_token_ids=stop_ids
        )

    def generate(self, keys_and_prompts: Sequence[tuple[str, str]]) -> dict[str, str]:
        from stagesweep.evaluate.backends.base import GenerationRequest

        requests = [
            GenerationRequest(
                key, tuple(self.tokenizer(text, add_special_tokens=False).input_ids), text
            )
            for key, text in keys_and_prompts
        ]
        return {g.key: g.text for g in self.backend.generate(requests, self.generation_config())}

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        # Positional keys: judge items' own keys need not be unique across a caller's batches.
        texts = self.generate([(str(i), self.build_prompt(item)) for i, item in enumerate(items)])
        return [
            verdict(item, self.parse(texts[str(i)]), texts[str(i)]) for i, item in enumerate(items)
        ]

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
