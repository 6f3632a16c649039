"""Nothing silent: corrupted engines fail at load (content hashes), every manifest field is validated with a one-line
error, NaN weights fail the export's parity check, and non-finite logits at run time end their request with an
error instead of becoming token 0."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from skipdecode.export.parity import ParityError, check_parity
from skipdecode.export.random_models import build_random_opt
from skipdecode.runtime.device import HostRuntime
from skipdecode.runtime.engine import Engine
from skipdecode.runtime.errors import EngineError
from skipdecode.runtime.generator import NonFiniteLogitsError
from skipdecode.runtime.integrity import file_digest
from skipdecode.runtime.manifest import WEIGHTS_FILE, load_manifest
from skipdecode.runtime.request import GenerateOptions
from skipdecode.runtime.service import RequestFailedError, Service

from skipdecode.cli import main

from .conftest import PROMPTS


@pytest.fixture
def engine_copy(engine_dir, tmp_path):
    return shutil.copytree(engine_dir[2], tmp_path / "e")


def first_weight(d):
    man = load_manifest(d)
    name, w = min(man.weights.items(), key=lambda kv: kv[1].offset)
    return name, w


def poke(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def nan_weights(d) -> None:
    """Every float weight NaN, the scales of quantized drafts included (the hashes are not updated: load with
    verify=False)."""
    man = load_manifest(d)
    buf = np.fromfile(d / WEIGHTS_FILE, dtype=np.uint8)
    for w in man.weights.values():
        if w.dtype.startswith("float"):
            buf[w.offset: w.offset + w.nbytes].view(w.dtype)[:] = np.nan
    buf.tofile(d / WEIGHTS_FILE)


# -- parity ----------------------------------------------------------------------------------------------------------
def test_parity_fails_on_nan_weights(engine_dir, engine_copy):
    """max(0, nan) is 0: without the explicit check an all-NaN engine passed with "max diff 0"."""
    _, w = first_weight(engine_copy)
    poke(engine_copy / WEIGHTS_FILE, w.offset, np.full(w.nbytes // 4, np.nan, dtype=np.float32).tobytes())
    model = build_random_opt(engine_dir[0], seed=0, init_std=0.15)
    with pytest.raises(ParityError, match="non-finite"):
        check_parity(engine_copy, model)


# -- content hashes --------------------------------------------------------------------------------------------------
def flip_exponent(d):
    _, w = first_weight(d)
    poke(d / WEIGHTS_FILE, w.offset + 3, bytes([(d / WEIGHTS_FILE).read_bytes()[w.offset + 3] ^ 0x40]))


@pytest.mark.parametrize("breakage, file", [
    (flip_exponent, WEIGHTS_FILE),
    (lambda d: poke(d / WEIGHTS_FILE, 4096, np.full(1024, np.nan, np.float32).tobytes()), WEIGHTS_FILE),
    (lambda d: (d / WEIGHTS_FILE).write_bytes(bytes((d / WEIGHTS_FILE).stat().st_size)), WEIGHTS_FILE),
    (lambda d: poke(d / "decode_b006.onnx", 40, b"\x07"), "decode_b006.onnx"),
])
def test_corrupted_files_fail_at_load(engine_copy, breakage, file):
    breakage(engine_copy)
    with pytest.raises(EngineError, match=f"{file} of engine e is corrupted"):
        Engine.load(engine_copy)


def test_digest_is_independent_of_threads_and_covers_every_chunk(tmp_path):
    path = tmp_path / "blob"
    data = bytearray(np.random.default_rng(0).bytes(3 * 4096 + 17))
    path.write_bytes(data)
    one = file_digest(path, chunk_bytes=4096, threads=1)
    assert file_digest(path, chunk_bytes=4096, threads=4) == one
    assert file_digest(path, chunk_bytes=8192) != one  # the chunk size is part of the digest: it is recorded
    data[-1] ^= 1
    path.write_bytes(data)
    assert file_digest(path, chunk_bytes=4096) != one


def test_cli_corrupted_engine_exits_2_and_no_verify_skips(engine_copy, capsys):
    man = json.loads((engine_copy / "manifest.json").read_text())
    man["integrity"]["files"][WEIGHTS_FILE] = "0" * 64  # the files are intact; the record is not
    (engine_copy / "manifest.json").write_text(json.dumps(man))
    argv = ["generate", "--engine", str(engine_copy), "--prompt-ids", "2 5 7", "--max-new-tokens", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {WEIGHTS_FILE} of engine e is corrupted" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert main([*argv, "--no-verify"]) == 0


# -- non-finite logits at run time ----------------------------------------------------------------------------------
def test_nan_weights_are_an_error_per_request(engine_copy):
    nan_weights(engine_copy)
    engine = Engine.load(engine_copy, verify=False)
    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        engine.generate(PROMPTS, GenerateOptions(max_new_tokens=4))
    with Service(engine) as svc:
        handle = svc.submit(PROMPTS[0], GenerateOptions(max_new_tokens=4))
        with pytest.raises(RequestFailedError, match="not finite"):
            handle.result(timeout=30)
        assert svc.stats().finished == {"error": 1} and svc.stats().generated_tokens == 0


def test_http_nan_engine_is_a_500_json_error(engine_copy):
    pytest.importorskip("starlette")
    httpx = pytest.importorskip("httpx")
    from skipdecode.serve.app import create_app

    from .serving_fakes import serve_in_thread
    nan_weights(engine_copy)
    engine = Engine.load(engine_copy, verify=False)
    service = Service(engine)
    with serve_in_thread(create_app(engine, service)) as (url, _):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [2, 5, 7], "max_tokens": 4}, timeout=30)
    assert r.status_code == 500
    body = r.json()
    assert body["error"]["type"] == "server_error" and "not finite" in body["error"]["message"]


# -- manifest validation ---------------------------------------------------------------------------------------------
def _first(man):
    return min(man["weights"], key=lambda k: man["weights"][k]["offset"])


def _second(man):
    return sorted(man["weights"], key=lambda k: man["weights"][k]["offset"])[1]


def _set(path: str, value):
    def edit(man):
        *keys, last = path.split("/")
        d = man
        for k in keys:
            d = d[int(k)] if isinstance(d, list) else d[{"<first>": _first(man)}.get(k, k)]
        d[last] = value
    return edit


def _double(field):
    def edit(man):
        man["model"][field] *= 2
    return edit


def _add(field, n):
    def edit(man):
        man["model"][field] += n
    return edit


def _delete(key):
    return lambda man: man.pop(key)


def _overlap(man):
    a, b = man["weights"][_first(man)], man["weights"][_second(man)]
    b["offset"] = a["offset"] + 64


def _wrong_layers(man):
    g = next(g for g in man["graphs"] if g["kind"] == "decode" and g["budget"] < 6)
    g["layers"] = list(range(g["budget"]))


def _unhashed(man):
    man["integrity"]["files"].pop("prefill.onnx")


@pytest.mark.parametrize("edit, message", [
    (_set("weights/<first>/offset", -64), "offset=-64 is below the minimum 0"),
    (_set("weights/<first>/nbytes", 12), "nbytes=12 does not match its shape"),
    (_set("weights/<first>/dtype", "object"), "dtype='object' is not one of"),
    (_set("model/num_layers", 5), "num_layers=5"),
    (_set("model", []), "manifest.model must be a JSON object, got list"),
    (_set("model/hidden_size", "64"), "model.hidden_size='64' must be a positive integer"),
    (_set("max_batch", 1e9), "manifest.max_batch must be an integer, got 1000000000.0"),
    (_set("max_batch", 10**9), "manifest.max_batch=1000000000 is above the maximum 4096"),
    (_set("max_length", 4.5), "manifest.max_length must be an integer"),
    (_set("max_length", 1000), "manifest.max_length=1000 is above the maximum 128"),
    (_set("warmup_layers", True), "manifest.warmup_layers must be an integer"),
    (_delete("weights_file"), "manifest.weights_file is missing"),
    (_delete("integrity"), "manifest.integrity is missing"),
    (_set("graphs", {}), "manifest.graphs must be a JSON list"),
    (_set("graphs/0/file", "/etc/passwd"), "must be a file name inside the engine directory"),
    (_set("graphs/1/file", "../other/decode_b006.onnx"), "graphs[1].file='../other/decode_b006.onnx' must be"),
    (_set("weights_file", "../weights.bin"), "manifest.weights_file='../weights.bin' must be a file name"),
    (_set("tokenizer", "/tmp/tokenizer.json"), "manifest.tokenizer='/tmp/tokenizer.json' must be a file name"),
    (_set("graphs/1/budget", 2.0), "budget must be an integer"),
    (_wrong_layers, "give layers"),
    (_overlap, "overlap"),
    (_unhashed, "no hash of 'prefill.onnx'"),
    (_set("integrity/algorithm", "shake_128"), "algorithm='shake_128' is not one of"),
    (_set("integrity/files/missing.bin", "00"), "hashes 'missing.bin', which is not a file"),
    (_set("integrity/files/.", "00"), "hashes '.', which is not a file"),
    (_double("hidden_size"), "graph prefill outputs[1] is"),
    (_add("vocab_size", 8), "graph prefill outputs[0] is"),
    (_double("num_heads"), "graph prefill outputs[1] is"),
])
def test_invalid_manifest_fields(engine_copy, edit, message, capsys):
    path = engine_copy / "manifest.json"
    man = json.loads(path.read_text())
    edit(man)
    path.write_text(json.dumps(man))
    with pytest.raises(EngineError, match=re.escape(message)):
        load_manifest(engine_copy)
    rc = main(["generate", "--engine", str(engine_copy), "--prompt-ids", "2 3"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_kv_cache_is_bounded_by_available_memory(engine_dir, monkeypatch):
    monkeypatch.setattr(HostRuntime, "available_bytes", staticmethod(lambda: 10**6))
    with pytest.raises(EngineError, match=r"needs \d+ bytes .* but only 1000000 bytes .* are available"):
        Engine.load(engine_dir[2], verify=False)


def test_available_bytes_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemFree:         10 kB\nMemAvailable:     300 kB\n")
    assert HostRuntime.available_bytes(str(meminfo)) == 300 * 1024
    assert HostRuntime.available_bytes(str(tmp_path / "missing")) is None
    assert HostRuntime.available_bytes() > 0


def test_deeply_nested_manifest_is_a_one_line_error(engine_copy, capsys):
    (engine_copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    rc = main(["generate", "--engine", str(engine_copy), "--prompt-ids", "2 3"])
    err = capsys.readouterr().err
    assert rc == 2 and "nests deeper" in err and len(err.strip().splitlines()) == 1


def test_a_weight_shape_that_keeps_the_byte_count_fails_at_load(engine_copy, capsys):
    """[K, N] relabelled [N, K] passes every manifest check (same bytes); the graphs fail on the load-time test
    input, so the engine is refused before it serves anything (not a 500 on every request)."""
    path = engine_copy / "manifest.json"
    man = json.loads(path.read_text())
    name = next(k for k, w in man["weights"].items() if len(w["shape"]) == 2 and w["shape"][0] != w["shape"][1]
                and "embed" not in k)
    man["weights"][name]["shape"] = man["weights"][name]["shape"][::-1]
    path.write_text(json.dumps(man))
    load_manifest(engine_copy)  # the manifest alone cannot tell
    for prepack in ("shared", "off"):
        rc = main(["generate", "--engine", str(engine_copy), "--prompt-ids", "2 3", "--prepack", prepack])
        err = capsys.readouterr().err
        assert rc == 2 and "fail on a test input" in err and len(err.strip().splitlines()) == 1, err


def test_an_engine_moved_aside_by_an_interrupted_export_is_named(engine_copy, capsys):
    aside = engine_copy.parent / f".{engine_copy.name}.old-999999"
    engine_copy.rename(aside)
    rc = main(["generate", "--engine", str(engine_copy), "--prompt-ids", "2 3"])
    err = capsys.readouterr().err
    assert rc == 2 and f"mv {aside} {engine_copy}" in err and len(err.strip().splitlines()) == 1
