"""The OpenAI-compatible backend: against a real `transformers serve` for token-exact greedy
answers, and against a scripted loopback HTTP server for retries, errors and concurrency."""

from __future__ import annotations

import threading
import time

import pytest
from serve_util import (
    JSONHandler,
    LoopbackServer,
    free_port,
    serving_extras_missing,
    transformers_serve,
)

from stagesweep.cli import UserError
from stagesweep.evaluate.backends.base import GenerationConfig, GenerationRequest, get_backend_class
from stagesweep.evaluate.backends.openai import OpenAIBackend
from stagesweep.evaluate.judges import llm, wildguard
from stagesweep.evaluate.judges.base import UNPARSED, JudgeItem
from stagesweep.tiny_model import ensure_tiny_model


class ScriptedServer(LoopbackServer):
    """A real HTTP server on loopback whose completions endpoint answers with a scripted
    sequence of status codes (then 200), recording every request it receives."""

    def __init__(self, statuses=(), owned_by="someone", delay=0.0):
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        lock = threading.Lock()
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, {"data": [{"id": "served-model", "owned_by": owned_by}]})

            def do_POST(self):
                body = self.read_json()
                with lock:
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    status = server.statuses.pop(0) if server.statuses else 200
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(delay)
                with lock:
                    server.in_flight -= 1
                if status != 200:
                    self.send_json(status, {"detail": f"scripted {status}"})
                    return
                text = "echo:" + body["prompt"][-8:]
                self.send_json(200, {"choices": [{"text": text, "finish_reason": "length"}]})

        self.serve(Handler)


@pytest.fixture
def scripted():
    servers = []

    def make(**kwargs):
        servers.append(ScriptedServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _requests(n):
    return [GenerationRequest(f"u{i}", (1, 2, i), f"prompt number {i:03d}") for i in range(n)]


def test_registry_resolves_openai_backend():
    assert get_backend_class("openai") is OpenAIBackend


def test_unreachable_server_is_a_one_line_user_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        OpenAIBackend(url)
    message = str(err.value)
    assert "\n" not in message
    assert f"cannot reach {url}/v1/models" in message
    assert "vllm serve" in message and "transformers serve" in message


def test_retries_429_and_5xx_with_backoff_then_succeeds(scripted):
    server = scripted(statuses=[503, 429])
    backend = OpenAIBackend(server.url, max_retries=3, tokenizer=None)
    (gen,) = backend.generate(_requests(1), GenerationConfig())
    assert gen.text == "echo:mber 000" and gen.finish_reason == "length"
    assert len(server.bodies) == 3  # two scripted failures, then the answer


def test_gives_up_after_max_retries_with_the_status(scripted):
    server = scripted(statuses=[503] * 10)
    backend = OpenAIBackend(server.url, max_retries=1)
    with pytest.raises(UserError, match="HTTP 503: scripted 503"):
        list(backend.generate(_requests(1), GenerationConfig()))
    assert len(server.bodies) == 2


def test_client_errors_are_not_retried(scripted):
    server = scripted(statuses=[422])
    backend = OpenAIBackend(server.url, max_retries=5)
    with pytest.raises(UserError, match="HTTP 422"):
        list(backend.generate(_requests(1), GenerationConfig()))
    assert len(server.bodies) == 1


def test_requests_run_concurrently_up_to_the_limit(scripted):
    server = scripted(delay=0.3)
    backend = OpenAIBackend(server.url, concurrency=4)
    seen = []
    gens = list(backend.generate(_requests(8), GenerationConfig(), progress=seen.append))
    assert sorted(g.key for g in gens) == [f"u{i}" for i in range(8)]
    assert sum(seen) == 8
    assert server.max_in_flight == 4


def test_api_key_comes_from_the_environment_and_never_leaks(scripted, monkeypatch):
    monkeypatch.setenv("STAGESWEEP_TEST_KEY", "sk-test-secret")
    server = scripted(statuses=[400])
    backend = OpenAIBackend(server.url, api_key_env="STAGESWEEP_TEST_KEY", max_retries=0)
    with pytest.raises(UserError) as err:
        list(backend.generate(_requests(1), GenerationConfig()))
    assert server.headers[0]["Authorization"] == "Bearer sk-test-secret"
    assert "sk-test-secret" not in str(err.value)


def test_request_body_is_plain_completion_with_stops_for_each_server_kind(scripted):
    tiny = ensure_tiny_model("llama")
    config = GenerationConfig(max_new_tokens=7, stop_token_ids=(4, 1))
    generic = scripted()
    list(OpenAIBackend(generic.url, tokenizer=str(tiny)).generate(_requests(1), config))
    body = generic.bodies[0]
    assert body["model"] == "served-model" and body["prompt"] == "prompt number 000"
    assert body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert "messages" not in body and "echo" not in body
    # transformers serve rejects unknown fields, so only the OpenAI schema's `stop` is used
    assert body["stop"] == ["<|eot_id|>", "<|end_of_text|>"] and "stop_token_ids" not in body
    vllm = scripted(owned_by="vllm")
    list(OpenAIBackend(vllm.url, tokenizer=str(tiny)).generate(_requests(1), config))
    assert vllm.bodies[0]["stop_token_ids"] == [4, 1] and "stop" not in vllm.bodies[0]
    assert vllm.bodies[0]["skip_special_tokens"] is False


@pytest.fixture(scope="module")
def gemma_server():
    reason = serving_extras_missing()
    if reason:
        pytest.skip(reason)
    path = ensure_tiny_model("gemma")
    with transformers_serve(path) as url:
        yield path, url


def _chat_requests(tokenizer):
    conversations = [
        [{"role": "user", "content": "Describe the weather in spring."}],
        [
            {"role": "user", "content": "Name a river."},
            {"role": "assistant", "content": "Answer: The Nile."},
            {"role": "user", "content": "Explain how to [REDACTED] a [REDACTED]."},
        ],
        [{"role": "user", "content": "Tell me about ancient Mesopotamia and its cities."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    ]
    requests = []
    for i, messages in enumerate(conversations):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        requests.append(GenerationRequest(f"q{i}", tuple(ids), text))
    return requests


def _reference(path, requests, config):
    """Greedy answers of the same checkpoint from the in-process hf backend."""
    hf = get_backend_class("hf")(str(path))
    try:
        return {g.key: (g.text, g.finish_reason) for g in hf.generate(requests, config)}
    finally:
        hf.close()


def test_transformers_serve_gives_the_same_greedy_answers_as_in_process(gemma_server):
    import torch
    from transformers import AutoTokenizer
    from transformers import GenerationConfig as HFGenerationConfig

    torch.set_num_threads(1)
    path, url = gemma_server
    tokenizer = AutoTokenizer.from_pretrained(path)
    requests = _chat_requests(tokenizer)
    # the rendered text starts with <bos> and the tokenizer adds one too: the doubling trap
    assert requests[0].prompt_text.startswith("<bos>")
    stop_ids = HFGenerationConfig.from_pretrained(path).eos_token_id
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=tuple(stop_ids))

    backend = OpenAIBackend(url, concurrency=2)
    served = {g.key: g for g in backend.generate(requests, config)}
    backend.close()

    for request in requests:
        # the server tokenized exactly the sweep's ids (no doubled BOS)
        assert served[request.key].extra["prompt_tokens"] == len(request.prompt_ids)
    reference = _reference(path, requests, config)
    assert {k: (g.text, g.finish_reason) for k, g in served.items()} == reference
    assert len({text for text, _ in reference.values()}) > 1  # answers differ per prompt


def test_pinned_server_rejects_another_model_name_clearly(gemma_server):
    _, url = gemma_server
    backend = OpenAIBackend(url, model="some/other-model", max_retries=0)
    with pytest.raises(UserError, match="HTTP 400.*pinned"):
        list(backend.generate(_requests(1), GenerationConfig(max_new_tokens=2)))


JUDGED = [
    JudgeItem("a", "Explain how to [REDACTED].", "I'm sorry, but I can't help with that."),
    JudgeItem("b", "Explain how to [REDACTED].", "Sure I can help with that! Step 1: [REDACTED]."),
]


def test_a_served_judge_reads_exactly_what_it_reads_in_process(gemma_server):
    path, url = gemma_server
    served = wildguard.WildGuardJudge(str(path), backend="openai", base_url=url, max_new_tokens=8)
    local = wildguard.WildGuardJudge(str(path), backend="hf", max_new_tokens=8)
    try:
        over_http, in_process = served.judge(JUDGED), local.judge(JUDGED)
    finally:
        served.close()
        local.close()
    assert [v.raw for v in over_http] == [v.raw for v in in_process]
    assert all(v.raw for v in over_http)
    assert [v.label for v in over_http] == [UNPARSED, UNPARSED]  # a random model's "verdict"


def test_llm_judge_talks_to_a_chat_endpoint(gemma_server):
    path, url = gemma_server
    judge = llm.LLMJudge(str(path), backend="openai", base_url=url, max_new_tokens=8)
    assert judge.chat
    try:
        verdicts = judge.judge(JUDGED)
    finally:
        judge.close()
    assert [v.key for v in verdicts] == ["a", "b"]
    assert all(v.raw and v.label == UNPARSED for v in verdicts)
