"""The package facade: `from skipdecode import Engine, GenerateOptions, SamplingParams`, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import skipdecode


def test_facade_names_are_the_runtime_objects():
    from skipdecode.runtime import engine, ort_sessions, request, sampling, service

    from skipdecode import Engine, GenerateOptions, SamplingParams, Service, ServiceConfig, configure_onnxruntime
    assert Engine is engine.Engine and GenerateOptions is request.GenerateOptions
    assert SamplingParams is sampling.SamplingParams and Service is service.Service
    assert ServiceConfig is service.ServiceConfig and configure_onnxruntime is ort_sessions.configure_onnxruntime
    assert set(skipdecode.__all__) <= set(dir(skipdecode))
    assert all(getattr(skipdecode, name) is not None for name in skipdecode.__all__)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Engin'"):
        skipdecode.Engin  # noqa: B018


def test_importing_the_package_loads_no_runtime():
    code = ("import sys, skipdecode, skipdecode.cliargs\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'numpy', 'torch')\n"
            "             or m.startswith('skipdecode.runtime')))\n"
            "from skipdecode import GenerateOptions\n"
            "print('skipdecode.runtime.request' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.strip().splitlines()
    assert first == "[]" and second == "True"
