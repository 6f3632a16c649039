"""`skipdecode serve` stopped by a signal with a full queue: every request gets a real answer. Within the drain
timeout they complete; past it a plain request is a JSON 503 and a stream ends with finish_reason "length" and
[DONE]. Never a bare 500 or a reset connection."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("uvicorn", reason="the HTTP server needs the serve extra")
import httpx  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_drain_that_outlasts_its_timeout_answers_every_request(tiny_engine, tmp_path, sig):
    port, log = _free_port(), tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "skipdecode.serve_cli", "--engine", str(tiny_engine),
                                 "--port", str(port), "--max-batch", "1", "--drain-timeout", "1"],
                                stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        results: dict = {}
        first = threading.Event()

        def call(i: int) -> None:
            body = {"prompt": [2, 3 + i], "max_tokens": 120, "ignore_eos": True, "stream": i % 2 == 0,
                    "speedup": 1}
            try:
                if body["stream"]:
                    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as s:
                        first.set()
                        lines = [line for line in s.iter_lines() if line]
                    results[i] = ("stream", s.status_code, lines[-2:])
                else:
                    first.set()
                    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                    results[i] = ("plain", r.status_code, r.json())
            except (httpx.HTTPError, ValueError) as exc:  # a reset, a cut stream, or a body that is not JSON
                results[i] = ("broken", None, repr(exc))

        calls = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in calls:
            t.start()
        assert first.wait(30)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).json()["queue_depth"] < 8:  # one running, the rest queued
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(sig)
        for t in calls:
            t.join(90)
        assert proc.wait(60) in (0, -sig, 130), log.read_text()[-2000:]  # uvicorn re-raises the signal it caught
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert len(results) == 16
    for i, (kind, status, body) in sorted(results.items()):
        assert kind != "broken", (i, body)
        if kind == "plain":
            assert status == 200 or (status == 503 and body["error"]["type"] == "unavailable_error"), (i, body)
        elif status == 503:  # it arrived after the signal: refused before it started, as JSON
            assert '"type":"unavailable_error"' in body[-1].replace(" ", ""), (i, body)
        else:
            assert status == 200 and body[-1] == "data: [DONE]", (i, body)
            assert '"finish_reason":"length"' in body[0].replace(" ", ""), (i, body)
    assert "Traceback" not in log.read_text()
