"""The runtime is what a serving process installs: every module of `skipdecode.runtime` imports with torch and
transformers unavailable (checked in a fresh interpreter where importing them raises)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import skipdecode.runtime

BLOCKER = r"""
import importlib, json, pkgutil, sys
BLOCKED = ("torch", "transformers", "onnx", "onnxscript")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None

sys.meta_path.insert(0, Block())
import skipdecode.runtime as rt
names = sorted(m.name for m in pkgutil.iter_modules(rt.__path__))
for name in names:
    importlib.import_module(f"skipdecode.runtime.{name}")
print(json.dumps({"imported": names, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_every_runtime_module_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    want = sorted(m.name for m in pkgutil.iter_modules(skipdecode.runtime.__path__))
    assert out["imported"] == want and {"engine", "ort_backend", "generator", "service"} <= set(want)


def test_negative_control_the_blocker_blocks():
    code = BLOCKER.replace('for name in names:', 'import torch\nfor name in names:')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
