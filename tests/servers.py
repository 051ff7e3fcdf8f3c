"""Start a real `xbench serve` process on a free loopback port, for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen
    url: str
    api_key: str | None

    @property
    def headers(self) -> dict:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(overrides: list[str], api_key: str | None = None, ready_timeout: float = 120) -> RunningServer:
    port = free_port()
    env = dict(os.environ)
    env.pop("XBENCH_SERVER_API_KEY", None)
    args = [sys.executable, "-m", "xbench", "serve", "--port", str(port), *overrides]
    if api_key:
        args.append(f"server.api_key={api_key}")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + ready_timeout
    saw_503 = False
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            saw_503 = saw_503 or r.status_code == 503
            if r.status_code == 200:
                server = RunningServer(proc, url, api_key)
                server.saw_loading = saw_503  # type: ignore[attr-defined]
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become healthy in time")
