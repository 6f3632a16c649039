"""Resident-memory measurement of an engine: all bucket graphs loaded vs one plain copy of the weights.

Each measurement runs in a fresh subprocess (RSS of this process would include whatever it loaded before) and
reports the RSS growth caused by loading. "one copy" is a single onnxruntime session of the full-depth decode
graph that loads the weights itself from the external-data file: what a user without weight sharing would pay
for one graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = r"""
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
import numpy, onnxruntime as ort
from skipdecode.runtime.manifest import load_manifest
directory, mode = sys.argv[1], sys.argv[2]
man = load_manifest(directory)
before = rss()
if mode == "all":
    from skipdecode.runtime.engine import Engine
    engine = Engine.load(directory, max_batch=1, max_length=2, verify=False)  # verified by measure_memory
else:
    spec = man.decode(man.num_layers)
    sess = ort.InferenceSession(f"{directory}/{spec.file}", providers=["CPUExecutionProvider"])
print(json.dumps({"rss_bytes": rss() - before, "graphs": len(man.graphs) if mode == "all" else 1}))
"""


def _probe(directory: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(directory), mode], capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe ({mode}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(directory: str | Path, verify: bool = True) -> dict:
    """-> {all_buckets_bytes, one_copy_bytes, weights_file_bytes, ratio, graphs}. `verify`: check the content
    hashes first, here (an EngineError naming the file, not a failed probe)."""
    from .integrity import verify_files
    from .manifest import load_manifest
    directory = Path(directory)
    man = load_manifest(directory)
    if verify:
        verify_files(directory, man.integrity)
    all_b, one = _probe(directory, "all"), _probe(directory, "one")
    return {"all_buckets_bytes": all_b["rss_bytes"], "one_copy_bytes": one["rss_bytes"],
            "weights_file_bytes": man.weights_size, "graphs": all_b["graphs"],
            "ratio": all_b["rss_bytes"] / max(one["rss_bytes"], 1)}
