# GPU side: TensorRT plans, GPU tests and Nsight Systems profiles. See docs/GPU.md for the install story.
# `make export MODEL=opt-1.3b BACKEND=tensorrt` builds TensorRT plans with the default options;
# `make export-trt MODEL=...` also sets the dtype and a shared timing cache.
TRT_DTYPE ?= fp16
TRT_TIMING_CACHE ?= build/trt-timing.cache
PROFILE_OUT ?= build/profile
PROFILE_ARGS ?= --quick --no-hf --no-memory

.PHONY: gpu-install export-trt gpu-test profile

# Replace onnxruntime by onnxruntime-gpu and add TensorRT, cuda-python, polygraphy and nvtx (GPU machines only).
gpu-install:
	$(PY) -m pip uninstall --yes onnxruntime
	$(PY) -m pip install --quiet -e '.[export,dev,gpu]'

# Export MODEL with the matmul attention flavour and build one TensorRT plan per graph (timing cache reused).
export-trt:
	$(SD) export --model $(MODEL) --out $(OUT) --speedups $(EXPORT_SPEEDUPS) --dtype $(TRT_DTYPE) \
	    --backend tensorrt --trt-timing-cache $(TRT_TIMING_CACHE) --force

# GPU and cross-backend tests; -rs prints why a test skipped (missing onnxruntime-gpu, TensorRT or cuda-python).
gpu-test:
	$(PY) -m pytest -q -rs tests/test_gpu.py tests/test_polygraphy.py tests/test_profiling.py

# Nsight Systems timeline of the benchmark with the skipdecode NVTX ranges (steps and graph calls) and CUDA calls.
profile:
	@if command -v nsys >/dev/null 2>&1; then \
	    mkdir -p $(PROFILE_OUT) && \
	    nsys profile -t cuda,nvtx --force-overwrite true -o $(PROFILE_OUT)/skipdecode $(SD) bench $(PROFILE_ARGS) \
	        --out-dir $(PROFILE_OUT)/bench && \
	    echo "open $(PROFILE_OUT)/skipdecode.nsys-rep in Nsight Systems; ranges are in the 'skipdecode' domain"; \
	else \
	    echo "nsys (Nsight Systems) is not on PATH: install NVIDIA Nsight Systems (CUDA toolkit or the standalone" \
	         "nsight-systems package) and the gpu extra (make gpu-install) for the nvtx package, then re-run"; \
	    exit 1; \
	fi
