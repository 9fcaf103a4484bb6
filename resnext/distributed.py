"""torchrun / single-process setup shared by train.py and evaluate.py.

`RANK` in the environment means torchrun launched us: join the process group (NCCL on CUDA,
gloo on CPU) and take the GPU named by LOCAL_RANK. Otherwise run as one process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError
from .runtime import default_device

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """rank/world_size over all nodes, local_rank on this node, the device to use."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0


def _from_slurm() -> None:
    """`srun python train.py` without torchrun: take rank, world size and local rank from
    SLURM's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), as torchvision's and timm's
    references do. The rendezvous address comes from MASTER_ADDR / MASTER_PORT, which the
    batch script sets (e.g. MASTER_ADDR=$(scontrol show hostnames | head -n 1)); on one node
    they default to 127.0.0.1:29500. torchrun's own variables always win."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", 1)) < 2:
        return
    if "MASTER_ADDR" not in env and int(env.get("SLURM_NNODES", 1)) > 1:
        raise ConfigError("under srun on several nodes, set MASTER_ADDR (and MASTER_PORT) "
                          "to the first node, e.g. export MASTER_ADDR=$(scontrol show "
                          "hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)")
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def init_distributed(device: str | None = None, timeout_s: float = 1800.0,
                     local_rank: int | None = None) -> DistInfo:
    """Join torchrun's (or SLURM srun's) process group if launched by it, and pick the
    device.

    Args:
        device: 'cpu', 'cuda', 'cuda:1' ...; default CUDA when available, else CPU. Under
            torchrun a plain 'cuda' becomes cuda:LOCAL_RANK.
        timeout_s: seconds after which a collective waiting on a dead peer raises instead of
            hanging (init_process_group's timeout).
        local_rank: the old launcher's --local-rank flag; LOCAL_RANK from the environment wins.
    Returns:
        DistInfo.
    Raises:
        ConfigError (a ValueError): a device this process cannot use (runtime.default_device).
    """
    _from_slurm()
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    dev = default_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if launched else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # After torchrun --max-restarts restarts the group, its shared store still holds
            # the dead group's addresses (pytorch/pytorch#135712): keep each attempt's keys
            # apart. Multi-node restarts: also set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  world_size, is_master=False, timeout=timeout)
            kwargs.update(store=dist.PrefixStore(f"resnext/attempt{restart}", store),
                          rank=rank, world_size=world_size)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    """Destroy the process group if one exists (at exit, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
