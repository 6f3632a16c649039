"""The polygraphy cross-backend harness on CPU: two onnxruntime runners agree, a perturbed one is caught, and an
fp16 engine is judged against the fp32 reference with the per-output table (plus its own negative control)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("polygraphy", reason="polygraphy (dev extra) is not installed")

from skipdecode.export.exporter import ExportConfig, export  # noqa: E402
from skipdecode.export.fp16_parity import FP16_VS_FP32, Fp16ParityError, check_fp16_parity  # noqa: E402
from skipdecode.export.polygraphy_check import (  # noqa: E402
    TOLERANCES,
    CrossBackendError,
    OrtRunners,
    compare_engine,
    graph_feeds,
)
from skipdecode.export.random_models import build_random_opt  # noqa: E402
from skipdecode.runtime import contract as C  # noqa: E402
from skipdecode.runtime.errors import EngineError  # noqa: E402


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """fp32 and fp16 exports of one tiny OPT (gqa), two buckets each, and an fp32 matmul export."""
    root = tmp_path_factory.mktemp("poly")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(root / "ckpt")
    out = {}
    for key, dtype, attention in (("fp32", "fp32", "gqa"), ("fp16", "fp16", "gqa"), ("mm", "fp32", "matmul")):
        out[key] = root / key
        export(ExportConfig(lossless_policy="default",
                            model=str(root / "ckpt"), out=out[key], budgets=(2,), max_length=32, max_batch=4,
                            dtype=dtype, attention=attention), progress=False)
    return out


def weight(runners: OrtRunners, name: str) -> np.ndarray:
    w = runners.manifest.weights[name]
    raw = np.fromfile(runners.directory / runners.manifest.weights_file, dtype=np.uint8)
    return raw[w.offset: w.offset + w.nbytes].view(w.dtype).reshape(w.shape).copy()


@pytest.mark.parametrize("key", ["fp32", "mm"])
def test_two_onnxruntime_runners_agree(engines, key):
    a, b = OrtRunners(engines[key], label="a"), OrtRunners(engines[key], label="b")
    report = compare_engine(a.manifest, a, b, TOLERANCES["fp32"])
    assert set(report) == {g.name for g in a.manifest.graphs}
    for graph in a.manifest.graphs:
        assert set(report[graph.name]) == {o.name for o in graph.outputs}
        assert all(v["passed"] and v["finite"] and v["max_abs_diff"] == 0.0 for v in report[graph.name].values())


def test_negative_control_perturbed_weight_fails(engines):
    ref = OrtRunners(engines["mm"], label="ref")
    name = "model.decoder.layers.5.fc2.weight"  # top layer: every bucket runs it
    bad = OrtRunners(engines["mm"], label="bad", weight_override={name: weight(ref, name) * 1.01})
    with pytest.raises(CrossBackendError) as err:
        compare_engine(ref.manifest, ref, bad, TOLERANCES["fp32"])
    drafts = [g for g in ref.manifest.graphs if g.kind == "draft"]
    assert drafts  # lossless mode's int8 drafts read their own quantized copy of the weight, not the float one
    for graph in ref.manifest.graphs:
        assert (f"{graph.name}.logits" in str(err.value)) == (graph.kind != "draft"), graph.name


def test_feeds_are_realistic(engines):
    man = OrtRunners(engines["fp32"]).manifest
    prefill = graph_feeds(man.prefill(), man, iterations=1)[0]
    mask = prefill[C.ATTENTION_MASK]
    assert (mask.sum(axis=1) == 1).any(), "a single-token row exercises fp16 masking with left padding"
    assert (np.diff(mask, axis=1) >= 0).all(), "left padding: zeros then ones"
    assert (prefill[C.INPUT_IDS][mask == 1] < man.model.vocab_size).all()
    decode = graph_feeds(man.decode(2), man, iterations=2)
    for feed in decode:
        lengths = feed[C.PAST_LENGTH]
        assert lengths.dtype == np.int32 and lengths.max() < man.max_length - 1 and len(set(lengths)) == len(lengths)
        assert int(feed[C.KV_LENGTH]) == lengths.max() + 1
        k = feed[C.past_key(man.decode(2).layers[0])]
        assert np.array_equal(k.astype(np.float16).astype(k.dtype), k), "K/V must be exact in fp16"
    assert decode[0][C.GATE].all() and not decode[1][C.GATE].all()


def test_fp16_engine_within_table_of_fp32_reference(engines):
    report = check_fp16_parity(engines["fp16"], engines["fp32"])
    for outputs in report.values():
        for name, v in outputs.items():
            assert v["finite"] and v["passed"], name
            tol = FP16_VS_FP32.for_output(name)
            assert v["limit"] >= tol.atol
            assert 0 < v["max_abs_diff"] < v["limit"], name  # fp16 really differs, and stays inside the table


def test_fp16_negative_control_fails(engines):
    fp16 = OrtRunners(engines["fp16"], label="fp16-bad")
    name = "model.decoder.final_layer_norm.weight"
    fp16.weights[name] = OrtRunners(engines["fp16"], weight_override={name: weight(fp16, name) * 1.1}).weights[name]
    with pytest.raises(Fp16ParityError, match="logits"):
        check_fp16_parity(engines["fp16"], engines["fp32"], candidate=fp16)


def test_fp16_parity_refuses_engines_that_are_not_twins(engines):
    with pytest.raises(EngineError, match="float16 engine with a float32"):
        check_fp16_parity(engines["fp32"], engines["fp32"])
    with pytest.raises(EngineError, match="same model"):
        check_fp16_parity(engines["fp16"], engines["mm"])
