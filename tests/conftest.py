"""Shared fixtures: tiny OPT models of both styles, built in-process from an OPTConfig (no downloads); and the test
tiers. Every test module belongs to one tier, marked on its tests (`pytest -m unit`, `make test-unit`):

* unit: one module's logic in-process on fakes or tiny torch models; no exported engine, no process, no socket.
* integration: the real pieces together in-process: export tiny engines and run them (onnxruntime, the reference).
* system: what a user runs: servers over HTTP, subprocesses, Ray clusters, torchrun jobs.

`make test` runs every tier. A new test module must be added to TIERS below (collection fails otherwise).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from skipdecode.export.random_models import build_random_opt  # noqa: E402

TIERS = {
    "unit": ("architecture", "facade", "fp16_mask", "generation", "model_card", "profiling", "runtime_imports",
             "schedule", "scheduler", "speculative"),
    "integration": ("bench", "chunked_prefill", "cli", "concurrency", "ct2_peer", "demo", "engine", "engine_source",
                    "export_options", "export_safety", "finetune", "gpu", "integrity", "kernels", "lm_eval_harness",
                    "logprobs", "lossless", "lossless_drafts", "lossless_policy", "ort_capi", "polygraphy", "quality",
                    "quantize", "quantize_export", "reference", "scoring_service", "slots", "weights_after_load"),
    "system": ("finetune_scale", "openai_client", "ray_serve", "serve_drain", "server_hardening", "service_exit",
               "serving"),
}
_TIER_OF = {f"test_{name}": tier for tier, names in TIERS.items() for name in names}


def pytest_collection_modifyitems(config, items):
    missing = set()
    for item in items:
        module = item.path.stem
        tier = _TIER_OF.get(module)
        if tier is None:
            missing.add(module)
        else:
            item.add_marker(getattr(pytest.mark, tier))
    if missing:
        raise pytest.UsageError(f"test modules {sorted(missing)} are in no tier: add each to TIERS in "
                                "tests/conftest.py")


STYLES = ("tiny-preln", "tiny-postln")
VOCAB = 211
# Three prompts of different lengths: a static batch with left padding.
PROMPTS = [[2, 17, 29, 41, 53, 67, 71], [2, 101, 5], [2, 7, 11, 13, 190]]


@pytest.fixture(scope="session", params=STYLES)
def tiny_model(request):
    """(style, model): init std 0.15 gives peaked logits so greedy ties do not make tests flaky."""
    return request.param, build_random_opt(request.param, seed=0, init_std=0.15)


@pytest.fixture(scope="session", params=STYLES)
def tiny_checkpoint(request, tmp_path_factory):
    """(style, directory) of a saved tiny checkpoint without a tokenizer."""
    out = tmp_path_factory.mktemp(request.param)
    build_random_opt(request.param, seed=0, init_std=0.15).save_pretrained(out)
    return request.param, out


@pytest.fixture(scope="session")
def engine_dir(tiny_checkpoint, tmp_path_factory):
    """(style, checkpoint, engine directory) of a tiny exported engine (buckets of speedups 2, 3, 5; 4 slots)."""
    from skipdecode.export.exporter import ExportConfig, export
    style, ckpt = tiny_checkpoint
    out = tmp_path_factory.mktemp("engines") / style
    export(ExportConfig(lossless_policy="default",
                        model=str(ckpt), out=out, speedups=(2.0, 3.0, 5.0), max_batch=4), progress=False)
    return style, ckpt, out


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """One tiny exported engine (4 KV slots, 128 positions) shared by the scale-out test modules."""
    from skipdecode.export.exporter import ExportConfig, export
    from skipdecode.export.random_models import build_random_opt
    root = tmp_path_factory.mktemp("ray-engine")
    build_random_opt("tiny-preln", seed=0, init_std=0.15).save_pretrained(root / "ckpt")
    export(ExportConfig(lossless_policy="default",
                        model=str(root / "ckpt"), out=root / "tiny", speedups=(2.0, 3.0), max_batch=4),
           progress=False)
    return root / "tiny"


EMBEDDED = "models/tiny-opt-kjv/skip-tuned"


@pytest.fixture(scope="session")
def kjv_engine_dir(tmp_path_factory):
    """The embedded skip-tuned model exported as a plain export does (int8 lossless drafts included): its shallow
    buckets agree with full depth often (drafts get accepted), so rounds accept different numbers of tokens;
    random-weight models mostly reject."""
    from skipdecode.export.exporter import ExportConfig, export
    out = tmp_path_factory.mktemp("lossless") / "kjv"
    export(ExportConfig(lossless_policy="default",
                        model=EMBEDDED, out=out, speedups=(2.0, 3.0, 5.0), max_batch=4, max_length=96),
           progress=False)
    return out


@pytest.fixture(scope="session")
def kjv_engine(kjv_engine_dir):
    from skipdecode.runtime.engine import Engine
    with Engine.load(kjv_engine_dir) as engine:
        yield engine
