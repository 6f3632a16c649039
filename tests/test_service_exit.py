"""A process that exits with requests in flight and never calls Service.shutdown() exits cleanly: the service is
shut down at interpreter exit (cancelling what runs) before onnxruntime is torn down under its worker thread,
which used to abort the process ("Assertion ... failed", SIGABRT) in some of the runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

_EXIT_WITH_REQUESTS_IN_FLIGHT = """
import atexit, sys
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.service import Service
handles = []
# registered before the service's own hook, so it runs after it (atexit is last in, first out)
atexit.register(lambda: print("reasons", sorted({h.result(timeout=30).finish_reason for h in handles}), flush=True))
engine = Engine.load(sys.argv[1])
svc = Service(engine)
handles += [svc.submit([2, 5, 7], GenerateOptions(max_new_tokens=120)) for _ in range(12)]
next(iter(handles[0]))  # generating
"""


@pytest.mark.parametrize("run", range(4))  # the abort was intermittent: several runs
def test_exit_without_shutdown_is_clean(engine_dir, run):
    proc = subprocess.run([sys.executable, "-c", _EXIT_WITH_REQUESTS_IN_FLIGHT, str(engine_dir[2])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'cancelled'" in proc.stdout and "Error" not in proc.stderr, (proc.stdout, proc.stderr[-2000:])


# A daemon thread generating on a plain engine (no Service) while the interpreter exits.
_EXIT_WHILE_A_THREAD_GENERATES = """
import sys, threading
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.request import GenerateOptions
engine = Engine.load(sys.argv[1], prepack=sys.argv[2])
started = threading.Event()
def loop():
    while True:
        for _ in engine.stream([[2, 5, 7], [2, 9]], GenerateOptions(max_new_tokens=60)):
            started.set()
threading.Thread(target=loop, daemon=True).start()
started.wait(60)
print("exiting", flush=True)
"""


@pytest.mark.parametrize("prepack", ["shared", "off"])
@pytest.mark.parametrize("run", range(3))
def test_exit_while_a_plain_thread_generates_is_clean(engine_dir, prepack, run):
    proc = subprocess.run([sys.executable, "-c", _EXIT_WHILE_A_THREAD_GENERATES, str(engine_dir[2]), prepack],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # was -11 (SIGSEGV) / -6 (SIGABRT)
    assert proc.stdout.strip() == "exiting" and "Error" not in proc.stderr, (proc.stdout, proc.stderr[-2000:])
