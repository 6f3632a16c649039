"""The export's target directory: one export at a time per target, and an engine in place whatever moment an export
dies.

* Lock: `.NAME.lock` next to the target, flock'ed (non-blocking) for the whole export. A second export to the same
  target fails at once instead of silently replacing the first one's engine.
* Work: everything is written into `.NAME.partial-PID` and moved into place only at `commit`, after the checks.
  Whether the target exists is checked at the start and again at commit (`--force` replaces it).
* Swap: the old engine is renamed aside (`.NAME.old-PID`), the new one renamed in, then the old one deleted. An
  exception between the renames puts the old one back; a process killed between them leaves the target missing and
  the old engine aside, which the next export to that target renames back before anything else (`recover`).
* Leftovers: partial and aside folders whose process is gone (SIGKILL, power loss) are swept at the start; the lock
  guarantees that no live export owns them.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
from pathlib import Path

from ..runtime.errors import EngineError
from ..runtime.manifest import aside_prefix


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)  # one place, so tests can fail or kill the swap between its steps


def _pid_of(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftovers(out: Path, kind: str) -> list[tuple[Path, int]]:
    """`.NAME.<kind>-PID` folders next to `out` whose process is gone (or is this one: a previous attempt)."""
    found = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
        pid = _pid_of(path)
        if pid is not None and (pid == os.getpid() or not _alive(pid)):
            found.append((path, pid))
    return found


def recover(out: Path) -> list[str]:
    """Undo what a killed export left next to `out` (call with the target's lock held). An engine moved aside
    while `out` is missing goes back into place; asides next to an existing `out` (the kill came after the new
    engine was renamed in) and stale partial folders are deleted. -> what was done, one line each."""
    done = []
    for aside, pid in _leftovers(out, "old"):
        if not out.exists():
            _rename(aside, out)
            done.append(f"restored the engine that export process {pid} had moved aside to {out}")
        else:
            shutil.rmtree(aside, ignore_errors=True)
            done.append(f"removed {aside.name} left by export process {pid}")
    for partial, pid in _leftovers(out, "partial"):
        shutil.rmtree(partial, ignore_errors=True)
        done.append(f"removed {partial.name} left by export process {pid}")
    return done


class ExportTarget:
    """`with ExportTarget(out, force) as t:` write into `t.tmp`, then `t.commit()`; leaving the block without a
    commit removes `t.tmp`. The lock is held from entry to exit."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.force = Path(out), force
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self.lock_path = self.out.parent / f".{self.out.name}.lock"
        self.recovered: list[str] = []
        self._fd: int | None = None

    def __enter__(self) -> ExportTarget:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.recovered = recover(self.out)
            self._check_free("already exists")
            self.tmp.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._unlock()

    def commit(self) -> None:
        """Move the finished `tmp` into place (see the module docstring for every moment it may die)."""
        self._check_free("appeared while this export ran (nothing was replaced)")
        if not self.out.exists():
            _rename(self.tmp, self.out)
            return
        aside = self.out.parent / f"{aside_prefix(self.out)}{os.getpid()}"
        _rename(self.out, aside)
        try:
            _rename(self.tmp, self.out)
        except BaseException:
            _rename(aside, self.out)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def _check_free(self, what: str) -> None:
        if self.out.exists() and not self.force:
            raise EngineError(f"{self.out} {what}: pass --force to replace it")

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise EngineError(f"another export to {self.out} is running (it holds {self.lock_path.name}): "
                                  "wait for it to finish") from None
            # The previous holder deletes the lock file while it still holds it (_unlock); a file locked after that
            # is no longer the one at the path, so lock again whatever is there now.
            try:
                current = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self._fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._fd is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
