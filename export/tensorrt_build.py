"""TensorRT plans for an exported engine directory: one plan per graph, built from the same ONNX files.

Weight strategy. TensorRT engines cannot share weight memory through the API: each deserialized engine owns the
weights it was built with (refit and weight streaming change or page that copy, they do not share it). Three
ways exist; `TrtBuildConfig.weights` picks one, "inputs" by default:
* "inputs" (default): the plans are built from copies of the ONNX graphs in which every weight initializer is a
  graph input of fixed shape (`weights_as_inputs`); the runtime binds them all to one device copy of
  weights.bin. Memory: the weights once, as onnxruntime does. Cost: TensorRT cannot constant-fold or re-layout
  weights, so tactics that pre-transform weights are unavailable (unmeasured here: no GPU in this environment).
* "embedded": plans built from the ONNX graphs as exported; each plan carries a copy of the weights it uses.
  Memory: the sum over graphs of their weights (`weight_memory`), ~#buckets x the middle layers.
* one engine with conditionals (IIfConditionalLayer per skippable layer): one copy, but the graph would need an
  If per layer and its K/V I/O for all layers every step; not implemented.

Profiles come from the manifest (`profile_shapes`): batch 1..max_batch, prompt 1..max_length-1, and the KV
buffers' column dim at max_length (the runtime may lower max_length, so the minimum is 2). One timing cache is
shared by every graph of a build and can be carried across builds (`TrtBuildConfig.timing_cache`).

TensorRT 11 builds strongly typed networks only (no FP16 flag): precision comes from the ONNX dtypes, so an fp16
engine comes from `--dtype fp16`. On TensorRT 10 the STRONGLY_TYPED creation flag asks for the same.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..runtime.errors import EngineError, check_int
from ..runtime.manifest import GraphSpec, Manifest
from ..runtime.trt_backend import WEIGHT_STRATEGIES, TrtPlans, import_tensorrt, weight_layout

TRT_DIR = "trt"  # plans, their ONNX sources and the timing cache, inside the engine directory
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class TrtBuildConfig:
    weights: str = "inputs"  # see the module docstring
    opt_batch: int | None = None  # batch TensorRT tunes kernels for; default the manifest's max_batch
    opt_prompt: int = 128  # prompt length the prefill plan is tuned for (clipped to the longest prompt)
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)
    optimization_level: int | None = None  # builder_optimization_level; None: TensorRT's default (3)
    tf32: bool = False  # fp32 engines: off keeps fp32 matmuls within the fp32 parity tolerances
    timing_cache: Path | None = None  # a cache file to start from and update (shared across builds)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_STRATEGIES:
            raise EngineError(f"weights={self.weights!r} is not one of {WEIGHT_STRATEGIES}")
        check_int("opt_prompt", self.opt_prompt, lo=1)


def profile_shapes(spec: GraphSpec, man: Manifest, cfg: TrtBuildConfig) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max]} for every input of `spec` with a symbolic dim (static inputs need none)."""
    longest_prompt = man.max_length - 1  # a prompt must leave a column for the first generated token
    dims = {"batch": (1, min(cfg.opt_batch or man.max_batch, man.max_batch), man.max_batch),
            "seq": (1, min(cfg.opt_prompt, longest_prompt), longest_prompt),
            "max_length": (2, man.max_length, man.max_length)}
    out = {}
    for s in spec.inputs:
        if all(isinstance(d, int) for d in s.shape):
            continue
        unknown = [d for d in s.shape if isinstance(d, str) and d not in dims]
        if unknown:
            raise EngineError(f"{spec.name}: input {s.name} has symbolic dim {unknown[0]!r} with no profile rule")
        out[s.name] = [[d if isinstance(d, int) else dims[d][i] for d in s.shape] for i in range(3)]
    return out


def weights_as_inputs(src: Path, dst: Path, weights: Sequence[str]) -> list[str]:
    """Copy the ONNX graph at `src` to `dst` with the initializers named in `weights` turned into graph inputs of
    the same dtype and fixed shape. Returns the moved names, in graph order. The copy has no external data."""
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    wanted = set(weights)
    moved, keep = [], []
    for init in graph.initializer:
        if init.name in wanted:
            moved.append(init)
        elif init.data_location == TensorProto.EXTERNAL:
            raise EngineError(f"{src.name}: initializer {init.name} is external data but no manifest weight")
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved)
    onnx.save(model, str(dst))
    return [t.name for t in moved]


def weight_memory(weights: Mapping[str, int], graph_weights: Mapping[str, Sequence[str]]) -> dict:
    """Device bytes of the weights under each strategy, from {weight: nbytes} and {graph: weights it uses}."""
    per_graph = {g: sum(weights[w] for w in names) for g, names in graph_weights.items()}
    shared = sum(weights.values())
    embedded = sum(per_graph.values())
    return {"shared_bytes": shared, "embedded_bytes": embedded, "per_graph_bytes": per_graph,
            "embedded_over_shared": embedded / max(shared, 1)}


def manifest_weight_memory(man: Manifest) -> dict:
    """`weight_memory` of an engine, plus the aligned device size of the "inputs" strategy's one copy."""
    report = weight_memory({n: w.nbytes for n, w in man.weights.items()}, {g.name: g.weights for g in man.graphs})
    report["inputs_device_bytes"] = weight_layout(man)[1]
    return report


def network_flags(trt) -> int:
    """Strongly typed: required on TensorRT 10 to take precision from the ONNX dtypes; TensorRT 11 is always
    strongly typed and ignores the flag."""
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_plans(directory: str | Path, man: Manifest, cfg: TrtBuildConfig = TrtBuildConfig(),
                progress: bool = True) -> TrtPlans:
    """Build one plan per graph of the (matmul-flavour) engine in `directory`; write them, `tensorrt.json` and the
    timing cache under `directory/trt`. Raises EngineError naming the graph that failed."""
    trt = import_tensorrt()
    if man.attention != "matmul":
        raise EngineError(f"TensorRT needs the matmul attention flavour (standard ONNX ops); this engine is "
                          f"{man.attention!r}: export with --backend tensorrt")
    directory = Path(directory)
    out = directory / TRT_DIR
    out.mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = cfg.timing_cache.read_bytes() if cfg.timing_cache and cfg.timing_cache.is_file() else b""
    cache = builder.create_builder_config().create_timing_cache(cache_bytes)
    runtime = trt.Runtime(logger)
    plans, sources, profiles, inputs, activations = {}, {}, {}, {}, {}
    # the verify graphs (lossless mode) are not built: TensorRT engines run SkipDecode, not lossless drafting
    for spec in (g for g in man.graphs if not g.kind.startswith("verify")):
        src = directory / spec.file
        if cfg.weights == "inputs":
            onnx_path = out / spec.file
            inputs[spec.name] = weights_as_inputs(src, onnx_path, spec.weights)
        else:
            onnx_path, inputs[spec.name] = src, []  # the parser resolves weights.bin next to the graph
        profiles[spec.name] = profile_shapes(spec, man, cfg)
        if progress:
            print(f"tensorrt: building {spec.name}", file=sys.stderr)
        plan = _build_one(trt, builder, logger, onnx_path, profiles[spec.name], cache, cfg, spec.name)
        (out / f"{spec.name}.plan").write_bytes(plan)
        engine = runtime.deserialize_cuda_engine(plan)
        activations[spec.name] = int(engine.get_device_memory_size_for_profile_v2(0))
        plans[spec.name] = f"{TRT_DIR}/{spec.name}.plan"
        sources[spec.name] = str(onnx_path.relative_to(directory))
    serialized = bytes(memoryview(cache.serialize()))
    (out / TIMING_CACHE).write_bytes(serialized)
    if cfg.timing_cache is not None:
        cfg.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        cfg.timing_cache.write_bytes(serialized)
    result = TrtPlans(tensorrt_version=trt.__version__, weights=cfg.weights, plans=plans, onnx=sources,
                      profiles=profiles, weight_inputs=inputs, timing_cache=f"{TRT_DIR}/{TIMING_CACHE}",
                      activation_bytes=activations)
    result.write(directory)
    return result


def _build_one(trt, builder, logger, onnx_path: Path, shapes: dict, cache, cfg: TrtBuildConfig, name: str) -> bytes:
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path.name} ({name}): {errors}")
    config = builder.create_builder_config()
    if cfg.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.optimization_level is not None:
        config.builder_optimization_level = cfg.optimization_level
    if not cfg.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in shapes.items():
        profile.set_shape(tensor, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT rejected the optimisation profile of {name}: {shapes}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {name}; see the TensorRT log above")
    return bytes(memoryview(plan))
