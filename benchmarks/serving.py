"""Start a real `xbench serve` process on a free loopback port: for the benchmarks that measure
the server over HTTP and for the tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Callable

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
    log: IO[str]  # the server's stdout and stderr
    saw_loading: bool = False  # /health answered 503 before it answered 200

    @property
    def headers(self) -> dict:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def rss_mb(self) -> float:
        """The server process's resident memory (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    def connect(self) -> socket.socket:
        """A raw TCP connection, for clients that misbehave below HTTP."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=10)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_for(self, ready: Callable[[], bool], timeout: float = 120) -> httpx.Response:
        """Poll /health until `ready()` holds; the last /health answer."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early: {self.output()}")
            try:
                if ready():
                    return httpx.get(self.url + "/health", timeout=2)
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError(f"server did not get ready in time: {self.output()[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait()
        self.log.close()
        return code


def closed_by_server(sock: socket.socket, wait_s: float = 0.2) -> bytes | None:
    """What the server sent on `sock` before closing it, or None while it is still open."""
    sock.settimeout(wait_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return data


def start_server(overrides: list[str], api_key: str | None = None, ready_timeout: float = 120,
                 wait_for_health: bool = True) -> RunningServer:
    """`xbench serve` on a free loopback port; returns once /health is 200 (or at once)."""
    port = free_port()
    env = dict(os.environ)
    env.pop("XBENCH_SERVER_API_KEY", None)
    args = [sys.executable, "-m", "xbench", "serve", "--port", str(port), *overrides]
    if api_key:
        args.append(f"server.api_key={api_key}")
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server never blocks on it
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", api_key, log)
    if wait_for_health:
        def healthy() -> bool:
            code = httpx.get(server.url + "/health", timeout=2).status_code
            server.saw_loading = server.saw_loading or code == 503
            return code == 200

        server.wait_for(healthy, ready_timeout)
    return server
