"""Where a serving process finds its engine: a local directory, or an archive URI fetched once per machine.

`skipdecode serve` resolves its engine here, with or without Ray. Replicas on other machines need the engine
directory, and an export needs torch and minutes, so a replica never exports. Two ways to get the directory there:

* a path (or a file:// URI of a directory): the engine directory itself, on a filesystem every machine mounts at
  the same path (NFS, a read-only volume in each pod, ...). Nothing is copied; `Engine.load` verifies the files.
* an archive URI (file://, http:// or https://, a tar archive of the engine directory, optionally compressed):
  the first replica on a machine downloads and unpacks it into the machine's engine cache, checks every file
  against the content hashes in the archive's own manifest (runtime/integrity.py) and only then renames the
  directory into place, so a half-written or corrupted copy is never seen. The other replicas on the machine wait
  on a file lock and reuse the directory. `manifest_sha256` (the sha256 of the engine's manifest.json) pins the
  exact export: an archive with another manifest is refused, so a replaced archive cannot slip in a different
  model whose files match their own manifest.

    tar -czf tiny-opt-kjv.tar.gz -C engines tiny-opt-kjv     # one top-level directory, or the files at the top
    sha256sum engines/tiny-opt-kjv/manifest.json              # the value for manifest_sha256 / --manifest-sha256

Bounds: the download stops at SKIPDECODE_MAX_ENGINE_BYTES (default 256 GiB) and only regular files are read
from file:// URIs; only manifest.json and the files its integrity section names are extracted (each no larger than
the bytes left under the cap), after the pin is checked against the archive's manifest; partial fetches left by a
killed replica are swept under the lock; the cache is keyed by the URI without its query and credentials (a new
presigned signature reuses the copy); error messages never show credentials or query strings.

No torch, no Ray: only the standard library and the runtime's manifest and integrity checks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from skipdecode.runtime.errors import EngineError, InputError
from skipdecode.runtime.integrity import verify_files
from skipdecode.runtime.manifest import MANIFEST as MANIFEST_NAME
from skipdecode.runtime.manifest import load_manifest

CACHE_ENV = "SKIPDECODE_ENGINE_CACHE"
ARCHIVE_SCHEMES = ("file", "http", "https")
DOWNLOAD_TIMEOUT_S = 60.0  # per blocking socket operation: a stalled server fails the replica's start, not hangs it
COPY_CHUNK = 8 * 2**20
MAX_BYTES_ENV = "SKIPDECODE_MAX_ENGINE_BYTES"
DEFAULT_MAX_BYTES = 256 * 2**30
MAX_MANIFEST_BYTES = 64 * 2**20


def max_engine_bytes() -> int:
    """The most bytes a fetch downloads, and extracts: $SKIPDECODE_MAX_ENGINE_BYTES, else 256 GiB."""
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None:
        return DEFAULT_MAX_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{MAX_BYTES_ENV}={raw!r} must be a positive number of bytes")
    return int(raw)


def redact(source: str) -> str:
    """A URI as it may appear in messages and logs: no user, password or query string (presigned signatures)."""
    if "://" not in source:
        return source
    parts = urllib.parse.urlsplit(source)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "…" if parts.query else "", ""))


@dataclass(frozen=True)
class ResolvedEngine:
    """A local engine directory; `verified` is True when its files were just checked against the manifest (so the
    loader need not hash them a second time)."""

    path: Path
    verified: bool


def default_cache_dir() -> Path:
    """$SKIPDECODE_ENGINE_CACHE, else ~/.cache/skipdecode/engines: per machine, shared by its replicas."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "skipdecode" / "engines"


def is_archive_uri(source: str) -> bool:
    """True for a URI the replicas download (file:// of a file, http://, https://); False for a directory path."""
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme == "file":
        return not Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path)).is_dir()
    return scheme in ("http", "https")


def engine_name(source: str) -> str:
    """The name an engine source is served under by default: its last path part without archive suffixes."""
    path = urllib.parse.urlsplit(source).path if "://" in source else source
    name = Path(path.rstrip("/")).name or "skipdecode"
    for suffix in (".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or "skipdecode"
    return name


def normalize_source(source: str) -> str:
    """A source as every replica can read it, wherever it runs: an existing local directory as an absolute path,
    an existing local archive file as its file:// URI; URIs and other paths unchanged."""
    if "://" in source:
        return source
    path = Path(source)
    if path.is_dir():
        return str(path.resolve())
    return path.resolve().as_uri() if path.is_file() else source


def check_source(source: str) -> None:
    """Reject what no replica could resolve, before anything is deployed. Raises InputError naming the value."""
    if not isinstance(source, str) or not source:
        raise InputError(f"engine source {source!r} is not a path or URI: give an engine directory or a file://, "
                         "http:// or https:// URI of a tar archive of one")
    scheme = urllib.parse.urlsplit(source).scheme
    if "://" in source and scheme not in ARCHIVE_SCHEMES:
        raise InputError(f"engine URI scheme {scheme!r} of {redact(source)!r} is not supported (supported: "
                         f"{', '.join(ARCHIVE_SCHEMES)}); mount the store as a shared path, or serve the archive "
                         "over https (a presigned URL works)")


def manifest_digest(directory: Path) -> str:
    return hashlib.sha256((Path(directory) / MANIFEST_NAME).read_bytes()).hexdigest()


def resolve_engine(source: str, cache_dir: str | Path | None = None, manifest_sha256: str | None = None,
                   verify: bool = True) -> ResolvedEngine:
    """The local engine directory for `source` (see the module docstring). An archive is fetched at most once per
    cache directory; its files are verified against its manifest before it is used (unless verify=False), and a
    cached copy that no longer verifies is fetched again. Raises InputError (bad source), EngineError (not an
    engine, corrupted, or another export than `manifest_sha256`)."""
    check_source(source)
    if manifest_sha256 is not None:
        manifest_sha256 = manifest_sha256.strip().lower()
        if len(manifest_sha256) != 64 or any(c not in "0123456789abcdef" for c in manifest_sha256):
            raise InputError(f"manifest_sha256={manifest_sha256!r} must be 64 hex digits (sha256sum of the engine's "
                             f"{MANIFEST_NAME})")
    if not is_archive_uri(source):
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(source).path)) if "://" in source \
            else Path(source)
        if not (path / MANIFEST_NAME).is_file():
            raise EngineError(f"engine directory {str(path)!r} has no {MANIFEST_NAME} on this machine: give an "
                              "engine directory (with Ray: one every node mounts), or an archive URI of one")
        _check_pin(path, manifest_sha256, source)
        return ResolvedEngine(path, False)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # by the URI without credentials and query: a new presigned signature of the same object reuses the copy (its
    # content is checked against its manifest, and the pin, on every resolve)
    key = hashlib.sha256(redact(source).encode()).hexdigest()[:16]
    final = cache / f"{engine_name(source)}-{key}"
    with open(cache / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine; the other replicas wait here, then reuse it
        for partial in cache.glob(f".{final.name}.*"):  # a fetch killed midway (only the lock holder fetches)
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
        if (final / MANIFEST_NAME).is_file():
            try:
                _check_pin(final, manifest_sha256, source)
                if verify:
                    verify_files(final, load_manifest(final).integrity)
                return ResolvedEngine(final, verify)
            except (EngineError, OSError):
                shutil.rmtree(final)  # changed on disk since it was unpacked: fetch it again
        _fetch(source, cache, final, manifest_sha256, verify)
        return ResolvedEngine(final, verify)


def _check_pin(directory: Path, manifest_sha256: str | None, source: str) -> None:
    if manifest_sha256 is None:
        return
    got = manifest_digest(directory)
    if got != manifest_sha256:
        raise EngineError(f"engine {redact(source)!r}: its {MANIFEST_NAME} has sha256 {got[:16]}..., the pinned "
                          f"manifest_sha256 is {manifest_sha256[:16]}... (another export; re-pin or fix the source)")


def _fetch(source: str, cache: Path, final: Path, manifest_sha256: str | None, verify: bool) -> None:
    """Download and unpack `source` into a temporary directory of `cache`, check it, rename it to `final`."""
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache))
    try:
        archive = work / "archive"
        limit = max_engine_bytes()
        _download(source, archive, limit)
        root = _unpack(archive, work / "unpacked", source, manifest_sha256, limit)
        if verify:
            verify_files(root, load_manifest(root).integrity)
        os.rename(root, final)  # atomic on one filesystem: `final` is complete or absent
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download(source: str, archive: Path, limit: int) -> None:
    """Copy `source` to `archive`, at most `limit` bytes; file:// only from a regular file (not /dev/zero)."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme == "file":
        path = urllib.request.url2pathname(parts.path)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise EngineError(f"could not read engine archive {redact(source)!r}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise EngineError(f"engine archive {redact(source)!r} is not a regular file")
    done = 0
    try:
        with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response, open(archive, "wb") as f:
            announced = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            if announced is not None and announced.isdigit() and int(announced) > limit:
                raise EngineError(f"engine archive {redact(source)!r} is {int(announced)} bytes, above the limit of "
                                  f"{limit} bytes ({MAX_BYTES_ENV})")
            while chunk := response.read(COPY_CHUNK):
                done += len(chunk)
                if done > limit:
                    raise EngineError(f"engine archive {redact(source)!r} goes above the limit of {limit} bytes "
                                      f"({MAX_BYTES_ENV}); download stopped")
                f.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise EngineError(f"could not download engine {redact(source)!r}: {reason}") from None


def _unpack(archive: Path, dest: Path, source: str, manifest_sha256: str | None, limit: int) -> Path:
    """Extract the engine from a tar archive -> the directory holding manifest.json (the top of the archive or its
    single top-level directory). The manifest is read first and checked against the pin; then only the files its
    integrity section names are extracted, as plain files (no links, devices or paths outside `dest`)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = {m.name.lstrip("./") or ".": m for m in tar.getmembers()}
            tops = {name.split("/", 1)[0] for name in members}
            prefix = ""
            if MANIFEST_NAME not in members:
                if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST_NAME}" in members:
                    prefix = f"{next(iter(tops))}/"
                else:
                    raise EngineError(f"engine archive {redact(source)!r} has no {MANIFEST_NAME} at its top or in "
                                      f"its single top-level directory (found: {sorted(tops)[:5]})")
            man_member = members[prefix + MANIFEST_NAME]
            if not man_member.isfile() or man_member.size > MAX_MANIFEST_BYTES:
                raise EngineError(f"engine archive {redact(source)!r}: {MANIFEST_NAME} is not a plain file of at "
                                  f"most {MAX_MANIFEST_BYTES} bytes")
            raw = tar.extractfile(man_member).read()
            if manifest_sha256 is not None and hashlib.sha256(raw).hexdigest() != manifest_sha256:
                got = hashlib.sha256(raw).hexdigest()
                raise EngineError(f"engine {redact(source)!r}: its {MANIFEST_NAME} has sha256 {got[:16]}..., the "
                                  f"pinned manifest_sha256 is {manifest_sha256[:16]}... (another export; re-pin or "
                                  "fix the source)")
            try:
                files = json.loads(raw)["integrity"]["files"]
                names = [n for n in files if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
            except (ValueError, KeyError, TypeError):
                names = []  # load_manifest below says what is wrong with it
            dest.mkdir(parents=True)
            (dest / MANIFEST_NAME).write_bytes(raw)
            left = limit - len(raw)
            for name in names:
                m = members.get(prefix + name)
                if m is None:
                    continue  # reported by the manifest check as a missing file
                if not m.isfile():
                    raise EngineError(f"engine archive {redact(source)!r}: member {m.name!r} is not a plain file")
                if m.size > left:
                    raise EngineError(f"engine archive {redact(source)!r}: {name} would take the extracted engine "
                                      f"above the limit of {limit} bytes ({MAX_BYTES_ENV})")
                left -= m.size
                with tar.extractfile(m) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
    except (tarfile.TarError, EOFError) as exc:
        raise EngineError(f"engine {redact(source)!r} is not a readable tar archive ({exc}); make one with "
                          "`tar -czf ENGINE.tar.gz -C PARENT ENGINE_DIR`") from None
    return dest
