"""Every option of `skipdecode serve`, declared once: `ServeConfig`.

One field per option carries its default, its help, its limits and its command-line group; the `skipdecode serve`
flags are derived from the fields (`--max-queue` is `max_queue`), a Ray Serve config file's `args` are the same
names (configs/ray_serve.yaml), and the whole object is what `build_server` turns into a running server, in the
`skipdecode serve` process or in each Ray Serve replica (Ray pickles it to them: plain values only).

Options of the serving process itself (the HTTP listener, the Ray driver) are marked `process`: a Ray Serve config
file cannot set them, since Ray's own `http_options` and CLI own those.

Standard library only, so building the command-line parser stays cheap.
"""

from __future__ import annotations

import argparse
import functools
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from skipdecode.runtime.errors import InputError, check_bool, check_choice, check_int, check_number

API_KEY_ENV = "SKIPDECODE_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
RAY_GROUP = ("scale-out on Ray Serve (pip install -e .[ray]; Ray's proxy serves HTTP, with --header-timeout, "
             "--max-connections and --max-client-connections applied to it)")


def option(default: Any = MISSING, help: str | None = None, *, group: str | None = None, lo: float | None = None,
           hi: float | None = None, above: float | None = None, choices: tuple | str | None = None,
           env: str | None = None, process: bool = False, secret: bool = False) -> Any:
    """A `ServeConfig` field. `lo`/`hi`: inclusive bounds, `above`: exclusive lower bound (numbers);
    `choices`: the accepted values, or "module:NAME" of the runtime tuple that owns them (imported when checked,
    so the parser does not load the runtime); `env`: the environment variable that supplies the default;
    `process`: an option of the serving process, not of the app a Ray replica serves; `secret`: kept out of the
    config's repr (logs)."""
    meta = {"help": help, "group": group, "lo": lo, "hi": hi, "above": above, "choices": choices, "env": env,
            "process": process}
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class ServeConfig:
    """The options of one `skipdecode serve` (see the module docstring). Validated on construction: a bad value
    raises InputError naming it and its limit."""

    engine: str | None = option(None, "engine directory (built by `skipdecode export`), or a file://, http:// or "
                                "https:// URI of a tar archive of one, downloaded once per machine")
    host: str = option("127.0.0.1", "address to listen on", process=True)
    port: int = option(8000, "port to listen on", lo=0, hi=65535, process=True)
    model_name: str | None = option(None, "name reported in responses (default: the engine directory's name)")

    max_batch: int | None = option(None, "running sequences (default: the engine's KV slots)", group="batching",
                                   lo=1)
    max_queue: int = option(64, "waiting requests before 503 overloaded", group="batching", lo=1)
    max_tokens_in_flight: int | None = option(
        None, "KV columns reserved by running requests, prompt + max_tokens each (default: no limit)",
        group="batching", lo=1)
    max_prefill_tokens: int = option(64, "prompt tokens prefilled per step: a longer prompt is prefilled in "
                                     "chunks while running requests keep decoding (0: no limit, each prompt in one "
                                     "call)", group="batching", lo=0)
    strategy: str = option("gate", "gate: one call of the deepest row's graph, shallower rows gated; group: one "
                           "call per bucket", group="batching", choices="skipdecode.runtime.scheduler:STRATEGIES")
    max_timeout: float = option(600.0, "largest per-request timeout in seconds", group="batching", above=0)
    drain_timeout: float = option(30.0, "on shutdown, seconds to finish in-flight requests before cancelling them",
                                  group="batching", above=0)

    max_length: int | None = option(None, "positions per sequence (default: the engine's)", group="runtime", lo=1)
    providers: str = option("CPUExecutionProvider", "onnxruntime execution providers, comma-separated, in "
                            "priority order", group="runtime")
    threads: int | None = option(None, "onnxruntime intra-op threads (default: $SKIPDECODE_THREADS or every "
                                 "core; on Ray: the replica's CPUs)", group="runtime", lo=1)
    prepack: str | None = option(None, "weight pre-packing: shared (default), private (one packed copy per graph), "
                                 "off", group="runtime", choices="skipdecode.runtime.ort_backend:PREPACK_MODES")
    kernel: str | None = option(None, "quantized engines: exported, auto (default: the fastest kernel path that "
                                "passed parity, measured once per machine and cached), measure, or a candidate's "
                                "name (default: $SKIPDECODE_KERNEL, else auto)", group="runtime")
    verify: bool = option(True, "skip the content-hash check of the engine's files at load", group="runtime")
    engine_cache: str | None = option(None, "per-machine directory archive URIs are unpacked into (default: "
                                      "$SKIPDECODE_ENGINE_CACHE or ~/.cache/skipdecode/engines)", group="runtime")
    manifest_sha256: str | None = option(None, "sha256 of the engine's manifest.json: refuse any other export",
                                         group="runtime")

    api_key: str | None = option(None, f"require 'Authorization: Bearer KEY' on every route but /health (default: "
                                 f"${API_KEY_ENV})", group="access and limits", env=API_KEY_ENV, secret=True)
    allowed_hosts: str = option("", "comma-separated Host header names accepted besides localhost and the bind "
                                "address (DNS-rebinding guard; '*' accepts any)", group="access and limits")
    max_prompt_chars: int | None = option(None, "longest text prompt before tokenizing (default: 32 per model "
                                          "position)", group="access and limits", lo=1)
    header_timeout: float = option(10.0, "seconds for a request head to arrive (after connect or the first byte "
                                   "of a request)", group="access and limits", above=0, process=True)
    body_timeout: float = option(30.0, "seconds for a request body to arrive (408)", group="access and limits",
                                 above=0)
    keep_alive_timeout: float = option(5.0, "seconds an idle kept-alive connection stays open",
                                       group="access and limits", above=0, process=True)
    max_connections: int = option(512, "open connections; one beyond it is closed at once",
                                  group="access and limits", lo=1, process=True)
    max_client_connections: int = option(256, "open connections from one client address; one beyond it is closed "
                                         "at once, so one client cannot take every connection (behind a reverse "
                                         "proxy every request comes from its address: set it to max_connections)",
                                         group="access and limits", lo=1, process=True)
    log_level: str = option("warning", "uvicorn's log level", choices=LOG_LEVELS, process=True)

    ray: bool = option(False, "serve on Ray Serve: one engine per replica, Ray's HTTP proxy in front",
                       group=RAY_GROUP, process=True)
    replicas: int = option(1, "replicas (with autoscaling: the initial count)", group=RAY_GROUP, lo=1)
    address: str | None = option(None, "join this Ray cluster ('auto' or HOST:PORT of a `ray start --head`) "
                                 "instead of starting a local Ray instance", group=RAY_GROUP, process=True)
    min_replicas: int | None = option(None, "autoscaling lower bound (with --max-replicas)", group=RAY_GROUP, lo=0)
    max_replicas: int | None = option(None, "autoscaling upper bound (with --min-replicas)", group=RAY_GROUP, lo=1)
    target_ongoing_requests: float = option(8.0, "autoscaling target: requests in flight per replica",
                                            group=RAY_GROUP, above=0)
    max_ongoing_requests: int = option(64, "requests Ray sends one replica at once (its batch plus its queue)",
                                       group=RAY_GROUP, lo=1)
    max_queued_requests: int = option(256, "requests waiting in Ray for a free replica before 503 with "
                                      "Retry-After", group=RAY_GROUP, lo=1)
    replica_cpus: float = option(1.0, "CPUs Ray reserves per replica; also its default --threads",
                                 group=RAY_GROUP, above=0)
    retry_after: int = option(1, "Retry-After seconds on the 503s of Ray's proxy", group=RAY_GROUP, lo=0)
    health_check_period: float = option(10.0, "seconds between Ray's health checks of each replica",
                                        group=RAY_GROUP, above=0)
    health_timeout: float = option(5.0, "seconds /health waits for a replica before the proxy answers 503 (every "
                                   "replica dead or busy)", group=RAY_GROUP, above=0, process=True)
    ray_cpus: int | None = option(None, "CPUs of the local Ray instance (default: every core)", group=RAY_GROUP,
                                  lo=1, process=True)
    ray_start_timeout: float = option(300.0, "seconds for every replica to load its engine and report healthy",
                                      group=RAY_GROUP, above=0, process=True)
    ray_metrics: bool = option(False, "let the local Ray instance export Ray's own Prometheus metrics: Ray serves "
                               "them on every interface without authentication, whatever --host and --api-key "
                               "say, so they are off unless asked for (the app's /metrics, behind the API key, "
                               "sums every replica)", group=RAY_GROUP, process=True)

    def __post_init__(self) -> None:
        if self.engine is not None:
            from skipdecode.serve.engine_source import check_source
            check_source(self.engine)
        if self.api_key == "":  # an empty variable or flag: no key
            object.__setattr__(self, "api_key", None)
        types = _field_types()
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None and f.default is None:
                continue
            kind = types[f.name]
            if meta["choices"] is not None:
                check_choice(f.name, value, _choices(meta["choices"]))
            elif kind is bool:
                check_bool(f.name, value)
            elif kind is int:
                check_int(f.name, value, meta["lo"], meta["hi"])
            elif kind is float:
                check_number(f.name, value, meta["lo"], meta["hi"], above=meta["above"])
            elif not isinstance(value, str):
                raise InputError(f"{f.name} must be a string, got {value!r}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InputError(f"min_replicas={self.min_replicas!r} and max_replicas={self.max_replicas!r}: give both "
                             "bounds for autoscaling, or neither for a fixed count")
        if self.autoscaling:
            check_int("max_replicas", self.max_replicas, lo=max(1, self.min_replicas))
            if not self.min_replicas <= self.replicas <= self.max_replicas:
                raise InputError(f"replicas={self.replicas} (the initial count) must be within min_replicas="
                                 f"{self.min_replicas} and max_replicas={self.max_replicas}")

    @property
    def served_name(self) -> str:
        """The model name in responses: `model_name`, else the engine's directory or archive name."""
        if self.model_name:
            return self.model_name
        from skipdecode.serve.engine_source import engine_name
        return engine_name(self.engine or "")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    @property
    def graceful_shutdown_timeout(self) -> float:
        """How long Ray lets a stopping replica finish its requests: the drain, plus time to stop."""
        return self.drain_timeout + 5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str) -> ServeConfig:
        """From a config file's keys (the field names): unknown keys and process options are refused, and a
        field with an environment variable takes it when the key is absent."""
        known = {f.name for f in fields(cls) if not f.metadata["process"]}
        process = sorted(set(values) & {f.name for f in fields(cls)} - known)
        if process:
            raise InputError(f"{process} of {where} are options of the serving process (its HTTP listener or "
                             "Ray driver): set them in Ray's http_options or on the command line")
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown argument(s) {unknown} for {where}; known: {sorted(known)}")
        env = {f.name: os.environ.get(f.metadata["env"]) for f in fields(cls)
               if f.metadata["env"] and values.get(f.name) is None}
        return cls(**{**values, **{k: v for k, v in env.items() if v}})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `skipdecode serve` flags, one per `ServeConfig` field. `engine` is required here."""
    types, groups = _field_types(), {None: parser}
    for f in fields(ServeConfig):
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        g, flag = groups[meta["group"]], "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"help": meta["help"]}
        if types[f.name] is bool:
            if f.default:
                g.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", **kw)
            else:
                g.add_argument(flag, action="store_true", **kw)
            continue
        if types[f.name] is not str:
            kw["type"] = types[f.name]
        if isinstance(meta["choices"], tuple):
            kw["choices"] = meta["choices"]
        if f.name == "engine":
            kw["required"] = True
        else:
            kw["default"] = os.environ.get(meta["env"], f.default) if meta["env"] else f.default
        g.add_argument(flag, **kw)


@functools.cache
def _field_types() -> dict[str, type]:
    """Field name -> int, float, bool or str (None stripped from the annotation)."""
    hints = typing.get_type_hints(ServeConfig)
    return {name: next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
            for name, hint in hints.items()}


def _choices(spec: tuple | str) -> tuple:
    if isinstance(spec, tuple):
        return spec
    import importlib
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)
