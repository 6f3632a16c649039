"""Where training runs: device, precision, process group, data-parallel or sharded wrapping, distributed checkpoints.

Launch: one process per device by torchrun (`torchrun --nproc_per_node N $(which skipdecode) finetune ...`, or
`python -m torch.distributed.run ...`; several nodes through torchrun's rendezvous, see docs/finetune.md). torchrun
sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous address; this module only reads them and opens PyTorch's
process group (NCCL on CUDA, gloo on CPU). Without them the run is one process and opens no group.

Strategies (PyTorch's own engines, no hand-written gradient exchange):
  ddp   DistributedDataParallel: every rank holds the whole model and optimizer; gradients are averaged.
  fsdp  FSDP2 `fully_shard` on each decoder layer and on the root: parameters, gradients and AdamW states are
        sharded across ranks (for models whose weights plus optimizer state do not fit one device); master
        weights stay fp32, compute runs under autocast.
Both average gradients over ranks, so each rank scales its share of the loss by the world size (see finetune.py).

Checkpoints during training: `torch.distributed.checkpoint` (DCP) of the model and optimizer state dicts
(`get_state_dict`/`set_state_dict`, which give the same keys for a plain, DDP or FSDP model), so a checkpoint
written by N ranks resumes on any number of ranks and strategies.
"""

from __future__ import annotations

import os
import resource
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime.errors import InputError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str  # "fp32" | "bf16" (autocast; parameters stay fp32)
    strategy: str  # "single" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device not in DEVICES:
        raise InputError(f"device={device!r} must be one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device='cuda' but this torch build sees no CUDA device (torch.cuda.is_available() is "
                             "false): use --device cpu or a CUDA build of torch")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on GPUs that support it, fp32 elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16 support: use fp32")
    return precision


def setup(device: str = "auto", precision: str = "auto", strategy: str = "auto") -> Runtime:
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); else a single process."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy={strategy!r} must be one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    if world == 1:
        chosen = "single" if strategy in ("auto", "ddp") else "fsdp"
    else:
        chosen = "ddp" if strategy == "auto" else strategy
    return Runtime(rank, world, local_rank, dev, resolve_precision(precision, dev), chosen)


def teardown(rt: Runtime) -> None:
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, layers: torch.nn.ModuleList, rt: Runtime) -> torch.nn.Module:
    """Move to the device and wrap for the strategy. FSDP shards on the host first, so `.to(device)` moves only
    this rank's shards (a model larger than one device's memory never lands on one device whole)."""
    if rt.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(rt.device.type, (rt.world,))
        for layer in layers:  # one all-gather per layer: only one layer's full weights live at a time
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)  # embeddings, final norm, tied head
        return module.to(rt.device)
    module = module.to(rt.device)
    if rt.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return module


def no_sync(module: torch.nn.Module, rt: Runtime, last_micro_batch: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of a step (gradient accumulation)."""
    if rt.strategy == "ddp" and not last_micro_batch:
        return module.no_sync()
    return nullcontext()


def make_adamw(params_groups: list[dict], lr: float, betas: tuple[float, float], rt: Runtime) -> torch.optim.AdamW:
    """Fused AdamW on CUDA (one kernel for all parameters), the foreach (multi-tensor) one elsewhere."""
    fused = rt.device.type == "cuda"
    return torch.optim.AdamW(params_groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)


def all_reduce_sum(value: float, rt: Runtime) -> float:
    if rt.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(rt: Runtime) -> None:
    if rt.world > 1:
        dist.barrier()


def save_state(path: str, module: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards (or rank 0 the replicated state) into the DCP directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(module, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path, no_dist=not dist.is_initialized())


def load_state(path: str, module: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Collective: reads the DCP directory into this rank's (possibly sharded) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(module, opt)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(module: torch.nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Collective under FSDP: the whole unsharded state dict on CPU (on rank 0; other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reset_peak_memory(rt: Runtime) -> None:
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)


def peak_memory_bytes(rt: Runtime) -> int:
    """Peak device memory allocated by torch on CUDA; on CPU the process's peak resident set size."""
    if rt.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(rt.device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
