"""``vllm serve`` as a context manager: start on a free local port, wait for /health, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """The stock ``vllm serve MODEL`` CLI of this environment, on 127.0.0.1.

    ``url`` is the OpenAI base URL (``.../v1``), ``base`` the server root, ``model``
    the served name.
    """

    def __init__(self, model_dir: str | Path, flags: list[str], *, env: dict | None = None,
                 log_path: str | Path, model: str = "refrag", timeout: float = 600) -> None:
        self.model_dir, self.model, self.timeout = str(model_dir), model, timeout
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        self.log_path = Path(log_path)
        self.cmd = [str(Path(sys.executable).parent / "vllm"), "serve", self.model_dir, "--host", "127.0.0.1",
                    "--port", str(self.port), "--served-model-name", model, *flags]
        # env: variables to set; a value of None removes one from this process's environment.
        self.env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "VllmServer":
        import httpx

        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._log.flush()
                raise RuntimeError("server exited:\n" + self.log_path.read_text()[-5000:])
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"server did not start in {self.timeout:.0f} s (log: {self.log_path})")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
