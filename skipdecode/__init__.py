"""SkipDecode for OPT: export (torch side) and runtime (no torch).

The names a library user needs, importable from the package itself:

    from skipdecode import Engine, GenerateOptions, SamplingParams

They load on first use, so `import skipdecode.<module>` stays as light as the module it names (the CLI's `plan`
does not load onnxruntime). Where each lives: `Engine` in skipdecode.runtime.engine; `GenerateOptions`,
`Generation`, `TokenEvent` and `FinishEvent` in skipdecode.runtime.request; `SamplingParams` in
skipdecode.runtime.sampling; `Service` and `ServiceConfig` in skipdecode.runtime.service; `configure_onnxruntime`
in skipdecode.runtime.ort_sessions.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "skipdecode.runtime.engine",
    "GenerateOptions": "skipdecode.runtime.request",
    "Generation": "skipdecode.runtime.request",
    "TokenEvent": "skipdecode.runtime.request",
    "FinishEvent": "skipdecode.runtime.request",
    "SamplingParams": "skipdecode.runtime.sampling",
    "Service": "skipdecode.runtime.service",
    "ServiceConfig": "skipdecode.runtime.service",
    "configure_onnxruntime": "skipdecode.runtime.ort_sessions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'skipdecode' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
