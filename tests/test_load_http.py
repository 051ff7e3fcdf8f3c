"""`xbench load` against servers that will not serve it: it stops at once on a wrong endpoint,
waits out Retry-After when shed, and never exits 0 when nothing succeeded. The servers are real
HTTP servers on loopback ports; `xbench load` runs as a user runs it, in a subprocess."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest


@contextmanager
def answering(status: int, headers: dict[str, str] | None = None) -> Iterator[tuple[str, list[float]]]:
    """A loopback server answering every POST with `status` (and `headers`); yields its URL and
    the times of the POSTs it got."""
    posts: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            posts.append(time.monotonic())
            self.rfile.read(int(self.headers.get("content-length", 0)))
            body = b'{"message": "no"}'
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", posts
    finally:
        server.shutdown()
        server.server_close()


def load(url: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xbench", "load", url, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("status", [501, 500, 502, 404, 400, 503])
def test_a_first_answer_that_is_not_a_busy_server_stops_at_once(tmp_path, status):
    with answering(status) as (url, posts):  # a 503 without Retry-After is a broken server, not a busy one
        t0 = time.monotonic()
        result = load(url, "-d", "30", "-o", str(tmp_path / "r.json"), cwd=tmp_path)
        took = time.monotonic() - t0
    assert result.returncode == 2, result.stderr
    assert f"{status} at /v1/rerank" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400  # one line, an HTML page folded into it
    assert took < 15 and len(posts) <= 8 and not (tmp_path / "r.json").exists()


def test_shed_clients_wait_out_retry_after_and_a_run_with_no_success_fails(tmp_path):
    with answering(429, {"Retry-After": "1"}) as (url, posts):
        result = load(url, "-c", "2", "-d", "1", "--warmup", "0", "-o", str(tmp_path / "honour.json"), cwd=tmp_path)
        honoured = len(posts)
        posts.clear()
        rushed = load(url, "-c", "2", "-d", "1", "--warmup", "0", "--no-retry-after",
                      "-o", str(tmp_path / "rush.json"), cwd=tmp_path)
        ignored = len(posts)
    for run in (result, rushed):
        assert run.returncode == 1, run.stderr
        assert "no request succeeded" in run.stderr and "most requests were shed" in run.stdout
    # Two clients over a 3 s time limit, each waiting 1 s after every 429, send about 8 requests;
    # told to ignore it, they send as fast as the server answers.
    assert 2 <= honoured <= 12 and ignored > 5 * honoured, (honoured, ignored)
    assert (tmp_path / "honour.json").exists()  # the run is recorded: it says what the server did
