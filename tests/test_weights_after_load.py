"""After `Engine.load` returns, nothing done to the engine's files changes or kills the running engine.

`cp new/weights.bin engine/` truncates the file before writing it; an in-place rewrite changes its bytes. An engine
that still read its weights from a mapping of the file would fault (SIGBUS) or silently compute with the new bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.request import GenerateOptions

PROMPT = [2, 17, 29, 41, 53]

# Load, generate, then damage weights.bin the way users do and generate again in the same process.
_DAMAGE_AFTER_LOAD = """
import os, sys
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.request import GenerateOptions
engine = Engine.load(sys.argv[1], prepack=sys.argv[2])
opts = GenerateOptions(max_new_tokens=16)
first = engine.generate([[2, 17, 29, 41, 53]], opts)[0].tokens
path = os.path.join(sys.argv[1], "weights.bin")
size = os.path.getsize(path)
with open(path, "r+b") as f:  # rewritten in place with other bytes
    f.write(bytes([0x3f]) * size)
rewritten = engine.generate([[2, 17, 29, 41, 53]], opts)[0].tokens
os.truncate(path, 0)  # what `cp new/weights.bin engine/` does first
truncated = engine.generate([[2, 17, 29, 41, 53]], opts)[0].tokens
print("same" if first == rewritten == truncated else f"changed {first} {rewritten} {truncated}", flush=True)
"""


def _copy_engine(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("prepack", ["shared", "private", "off"])
def test_weights_file_damaged_after_load_changes_nothing(engine_dir, tmp_path, prepack):
    directory = _copy_engine(engine_dir[2], tmp_path / "engine")
    proc = subprocess.run([sys.executable, "-c", _DAMAGE_AFTER_LOAD, str(directory), prepack], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -7 was SIGBUS
    assert proc.stdout.strip() == "same", proc.stdout


def test_shared_prepacking_releases_only_packed_weights(engine_dir):
    _, _, directory = engine_dir
    with Engine.load(directory, prepack="shared") as engine:
        man = engine.manifest
        assert man.prepacked, "the exporter found no pre-packed weight"
        # every released weight is a matrix (float, or the int8 blocks of lossless mode's quantized drafts); the
        # embedding table (read by the token Gather) stays
        assert all(len(man.weights[n].shape) == 2 or n.endswith(".qweight") for n in man.prepacked)
        assert any(n.endswith(".qweight") for n in man.prepacked) == bool(man.drafts)
        assert not any("embed_tokens" in n for n in man.prepacked)
        packed_bytes = sum(man.weights[n].nbytes for n in man.prepacked)
        assert 0 < engine.backend.released_bytes <= packed_bytes


def test_a_weight_still_read_after_packing_is_kept(engine_dir, tmp_path):
    """Negative control of the load-time check: a manifest that claims the embedding table is pre-packed (the
    token Gather reads it every step) must not make the engine compute with released (zeroed) pages."""
    _, _, src = engine_dir
    with Engine.load(src, prepack="off") as engine:
        want = engine.generate([PROMPT], GenerateOptions(max_new_tokens=12))[0].tokens
    directory = _copy_engine(src, tmp_path / "engine")
    raw = json.loads((directory / "manifest.json").read_text())
    raw["prepacked"] = sorted(raw["weights"])  # every weight, the embedding and the norms included
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.warns(RuntimeWarning, match="still reads weights"):
        engine = Engine.load(directory, prepack="shared")
    with engine:
        assert engine.backend.released_bytes == 0
        assert engine.generate([PROMPT], GenerateOptions(max_new_tokens=12))[0].tokens == want


def test_manifest_prepacked_names_must_be_weights(engine_dir, tmp_path):
    from skipdecode.runtime.errors import EngineError
    directory = _copy_engine(engine_dir[2], tmp_path / "engine")
    raw = json.loads((directory / "manifest.json").read_text())
    raw["prepacked"] = ["no.such.weight"]
    (directory / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="no.such.weight"):
        Engine.load(directory)

