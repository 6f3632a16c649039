"""Engine distribution for scale-out (skipdecode/serve/engine_source.py), without Ray: a shared path is used in
place; an archive over file:// or loopback http is fetched once per cache by concurrent replicas, verified against
its own manifest, pinned by the manifest's hash, and never left half-made; `serve --ray` without Ray installed says
what to install."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading

import pytest
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError, InputError

from skipdecode.serve.engine_source import engine_name, normalize_source, resolve_engine

from .scaleout_helpers import make_archive


@pytest.fixture
def http_files(tmp_path):
    """A loopback HTTP server over tmp_path/www -> (base url, list of requested paths)."""
    root, hits = tmp_path / "www", []
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_local_path_and_file_uri_of_a_directory_are_used_in_place(tiny_engine, tmp_path, monkeypatch):
    for source in (str(tiny_engine), tiny_engine.as_uri()):
        got = resolve_engine(source, tmp_path / "cache")
        assert got.path == tiny_engine and not got.verified  # Engine.load verifies a shared path itself
    assert not (tmp_path / "cache").exists()  # nothing copied
    with pytest.raises(EngineError, match="has no manifest.json on this machine"):
        resolve_engine(str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="scheme 's3' of 's3://bucket/e.tar.gz' is not supported"):
        resolve_engine("s3://bucket/e.tar.gz")
    with pytest.raises(InputError, match="manifest_sha256='abc' must be 64 hex digits"):
        resolve_engine(str(tiny_engine), manifest_sha256="abc")
    assert engine_name("https://h/x/tiny-opt-kjv.tar.gz") == "tiny-opt-kjv" and engine_name(str(tiny_engine)) == "tiny"
    archive = make_archive(tiny_engine, tmp_path / "e.tar.gz")
    monkeypatch.chdir(tmp_path)  # relative paths become what a replica elsewhere can read
    assert normalize_source("e.tar.gz") == archive.as_uri() and normalize_source(".") == str(tmp_path)
    assert normalize_source("https://h/e.tar.gz") == "https://h/e.tar.gz"


def test_archive_is_downloaded_once_per_cache_by_concurrent_replicas_and_verified(tiny_engine, tmp_path, http_files):
    base, www, hits = http_files
    make_archive(tiny_engine, www / "tiny.tar.gz")
    pin = hashlib.sha256((tiny_engine / "manifest.json").read_bytes()).hexdigest()
    results, errors = [], []

    def replica():
        try:
            results.append(resolve_engine(f"{base}/tiny.tar.gz", tmp_path / "cache", manifest_sha256=pin))
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 3
    assert hits == ["/tiny.tar.gz"]  # three replicas on one machine, one download
    path = results[0].path
    assert all(r.path == path and r.verified for r in results)
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_engine.iterdir())
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [path.name]
    engine = Engine.load(path, verify=False)
    assert engine.backend.max_batch == 4
    engine.close()
    # a cached copy that changed on disk is fetched again
    (path / "weights.bin").write_bytes(b"\0" * 16)
    assert resolve_engine(f"{base}/tiny.tar.gz", tmp_path / "cache").path == path
    assert len(hits) == 2 and Engine.load(path).backend.max_batch == 4
    # files at the top of the archive, over file://
    flat = make_archive(tiny_engine, tmp_path / "flat.tar", top_dir=False)
    assert (resolve_engine(flat.as_uri(), tmp_path / "cache").path / "manifest.json").is_file()


def test_archive_that_fails_its_manifest_or_pin_is_refused_and_not_cached(tiny_engine, tmp_path, http_files):
    base, www, _ = http_files
    make_archive(tiny_engine, www / "bad.tar.gz", corrupt="weights.bin")
    with pytest.raises(EngineError, match="weights.bin of engine .* is corrupted"):
        resolve_engine(f"{base}/bad.tar.gz", tmp_path / "cache")
    make_archive(tiny_engine, www / "good.tar.gz")
    with pytest.raises(EngineError, match="the pinned manifest_sha256 is 0000000000000000"):
        resolve_engine(f"{base}/good.tar.gz", tmp_path / "cache", manifest_sha256="0" * 64)
    (www / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(EngineError, match="is not a readable tar archive"):
        resolve_engine(f"{base}/junk.tar.gz", tmp_path / "cache")
    with pytest.raises(EngineError, match="could not download engine .*missing.tar.gz"):
        resolve_engine(f"{base}/missing.tar.gz", tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []  # nothing half-made


NO_RAY = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
import skipdecode.serve.engine_source  # needs neither Ray nor torch
from skipdecode.serve_cli import main
sys.exit(main(["--engine", sys.argv[1], "--ray"]))
"""


def test_serve_ray_without_ray_installed_says_what_to_install(tiny_engine):
    proc = subprocess.run([sys.executable, "-c", NO_RAY, str(tiny_engine)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--ray needs Ray Serve" in proc.stderr and "pip install -e '.[ray]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_without_ray_takes_an_archive_uri_and_stops_cleanly_on_sigterm(tiny_engine, tmp_path):
    """`skipdecode serve` builds its server as each Ray replica does: from an archive URI too, fetched into the
    engine cache and verified; a SIGTERM drains it and stops it."""
    import signal
    import socket
    import time

    httpx = pytest.importorskip("httpx", reason="the HTTP server needs the serve extra: pip install -e .[serve]")
    pytest.importorskip("uvicorn", reason="the HTTP server needs the serve extra: pip install -e .[serve]")
    archive = make_archive(tiny_engine, tmp_path / "tiny.tar.gz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "skipdecode.serve_cli", "--engine", archive.as_uri(), "--port",
                                 str(port), "--threads", "1", "--engine-cache", str(tmp_path / "cache")],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": [2, 3], "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"][0]["tokens"]) == 3
        assert [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]] == ["tiny"]
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down: killed by SIGTERM, after the drain
        assert proc.wait(60) in (0, -signal.SIGTERM), log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "stopped after 1 requests" in log.read_text() and "Traceback" not in log.read_text()
    cached = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # not the lock file
    assert len(cached) == 1 and cached[0].name.startswith("tiny-") and (cached[0] / "manifest.json").is_file()


def test_archive_fetches_are_bounded_redacted_and_extract_only_the_engine(tiny_engine, tmp_path, monkeypatch):
    import io
    import tarfile

    from skipdecode.serve.engine_source import MAX_BYTES_ENV, redact
    # an extra file the manifest does not name rides along: it is not extracted
    archive = tmp_path / "extra.tar"
    with tarfile.open(archive, "w") as tar:
        for f in [*sorted(tiny_engine.iterdir()), None]:
            data = f.read_bytes() if f is not None else b"\1" * 2**20
            info = tarfile.TarInfo(f"{tiny_engine.name}/{f.name if f is not None else 'payload.bin'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = resolve_engine(archive.as_uri(), tmp_path / "cache").path
    assert not (got / "payload.bin").exists()
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in tiny_engine.iterdir())
    # a wrong pin is refused before any engine file is extracted
    with pytest.raises(EngineError, match="pinned manifest_sha256"):
        resolve_engine(archive.as_uri(), tmp_path / "cache2", manifest_sha256="0" * 64)
    assert not any((tmp_path / "cache2").rglob("weights.bin"))
    # the download stops at the stated limit; a device is not an archive
    monkeypatch.setenv(MAX_BYTES_ENV, "4096")
    with pytest.raises(EngineError, match="above the limit of 4096 bytes"):
        resolve_engine(archive.as_uri(), tmp_path / "cache3")
    assert not [p for p in (tmp_path / "cache3").iterdir() if p.is_dir()]  # nothing half-written stays
    monkeypatch.delenv(MAX_BYTES_ENV)
    with pytest.raises(EngineError, match="is not a regular file"):
        resolve_engine("file:///dev/zero", tmp_path / "cache4")
    # a partial fetch left by a killed replica is swept by the next one
    stale = tmp_path / "cache" / f".{got.name}.killed"
    stale.mkdir()
    (stale / "archive").write_bytes(b"\0" * 4096)
    resolve_engine(archive.as_uri(), tmp_path / "cache")
    assert not stale.exists()
    # credentials and signatures never reach a message; a new signature reuses the cached copy
    secret = "http://user:hunter2@127.0.0.1:9/e.tar.gz?X-Amz-Signature=abc123"
    assert redact(secret) == "http://127.0.0.1:9/e.tar.gz?…"
    with pytest.raises(EngineError) as info:
        resolve_engine(secret, tmp_path / "cache5")
    assert "hunter2" not in str(info.value) and "abc123" not in str(info.value)
