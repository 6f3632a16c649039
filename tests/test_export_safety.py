"""Export safety: one export per target (lock), the target re-checked at commit, an engine in place whatever moment
the swap dies (an exception or SIGKILL between its renames), stale partial folders of dead exports swept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from skipdecode.export import exporter
from skipdecode.export import target as target_mod
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.random_models import build_random_opt
from skipdecode.export.target import ExportTarget
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny checkpoint: these tests are about directories, not model styles."""
    out = tmp_path_factory.mktemp("ckpt")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(out)
    return out


def cfg(ckpt, out, **kw) -> ExportConfig:
    return ExportConfig(lossless_policy="default", model=str(ckpt), out=out, speedups=(2.0,), **kw)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


@pytest.fixture
def old_engine(ckpt, tmp_path):
    """An existing engine at tmp_path/e (warm-up 0: distinguishable from a re-export with the default 1)."""
    out = tmp_path / "e"
    export(cfg(ckpt, out, warmup_layers=0), progress=False)
    return out


def is_old(out: Path) -> bool:
    return Engine.load(out).manifest.warmup_layers == 0


def test_second_export_to_a_locked_target_fails_clearly(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "e"
    monkeypatch.setattr(exporter, "load_model", lambda *a: pytest.fail("the second export started working"))
    with ExportTarget(out, force=False):
        with pytest.raises(EngineError, match=r"another export to .*e is running \(it holds \.e\.lock\)"):
            export(cfg(ckpt, out), progress=False)
    monkeypatch.undo()
    export(cfg(ckpt, out), progress=False)  # the lock is gone with its holder
    assert siblings(out) == ["e"]


def test_target_is_rechecked_at_commit(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "e"
    real = exporter.check_parity

    def parity_then_someone_writes_the_target(directory, model):
        report = real(directory, model)
        out.mkdir()
        (out / "theirs").write_text("x")
        return report

    monkeypatch.setattr(exporter, "check_parity", parity_then_someone_writes_the_target)
    with pytest.raises(EngineError, match="appeared while this export ran"):
        export(cfg(ckpt, out), progress=False)
    assert [p.name for p in out.iterdir()] == ["theirs"] and siblings(out) == ["e"]


def test_exception_between_the_swap_renames_keeps_the_old_engine(ckpt, old_engine, monkeypatch):
    real, calls = target_mod._rename, []

    def second_rename_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("injected: rename of the new engine failed")
        real(src, dst)

    monkeypatch.setattr(target_mod, "_rename", second_rename_fails)
    with pytest.raises(OSError, match="injected"):
        export(cfg(ckpt, old_engine, force=True), progress=False)
    assert is_old(old_engine) and siblings(old_engine) == ["e"]


_KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from skipdecode.export import target
from skipdecode.export.exporter import ExportConfig, export
from skipdecode.export.random_models import build_random_opt
real, calls = target._rename, []
def rename(src, dst):
    calls.append(src)
    if len(calls) == 2:  # the old engine is aside, the new one not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
target._rename = rename
export(ExportConfig(lossless_policy="default",
                    model=sys.argv[1], out=Path(sys.argv[2]), speedups=(2.0,), force=True), progress=False)
"""


def test_sigkill_between_the_swap_renames_is_recovered(ckpt, old_engine):
    proc = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(ckpt), str(old_engine)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    left = siblings(old_engine)
    assert "e" not in left and any(n.startswith(".e.old-") for n in left), left  # the state a kill leaves
    with pytest.raises(EngineError, match="already exists"):  # the next export puts the old engine back first
        export(cfg(ckpt, old_engine), progress=False)
    assert is_old(old_engine) and siblings(old_engine) == ["e"]


def test_recovery_after_a_kill_then_forced_export(ckpt, old_engine):
    aside = old_engine.parent / f".e.old-{dead_pid()}"
    old_engine.rename(aside)
    (old_engine.parent / f".e.partial-{dead_pid()}").mkdir()
    export(cfg(ckpt, old_engine, force=True), progress=False)
    assert not is_old(old_engine) and siblings(old_engine) == ["e"]


def test_stale_partial_folders_of_dead_exports_are_swept(ckpt, tmp_path):
    out = tmp_path / "e"
    stale = tmp_path / f".e.partial-{dead_pid()}"
    stale.mkdir()
    (stale / "weights.bin").write_bytes(bytes(2**20))
    live = tmp_path / ".e.partial-1"  # pid 1 is alive: another export's folder is never touched
    live.mkdir()
    other = tmp_path / f".f.partial-{dead_pid()}"  # another target's: its own export sweeps it
    other.mkdir()
    export(cfg(ckpt, out), progress=False)
    assert siblings(out) == sorted([".e.partial-1", other.name, "e"])
