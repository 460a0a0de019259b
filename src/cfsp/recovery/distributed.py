"""The processes of a recovery run: one, or several started by ``torchrun`` / ``accelerate launch``.

cfsp does not launch or shard anything itself. A launcher starts N copies of the same command
with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; ``Cluster.start`` joins them into one
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs) and gives each its device.
``wrap`` then hands the models to PyTorch's own engines: ``DistributedDataParallel`` (every
process holds the whole student, gradients are averaged) or FSDP2's ``fully_shard`` (every
decoder block, of the student and of the frozen teacher, is split over the processes and gathered
one block at a time). Rank 0 alone logs, shows progress and writes the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from cfsp import models
from cfsp.errors import PeerFailed


@dataclass(frozen=True)
class Cluster:
    """This process's place in the run: rank, process count and the device it trains on."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def start(cls, device: torch.device | None = None) -> Cluster:
        """Join the launcher's process group (if started by one) and pick this process's device.

        One process: ``device`` (default: the model's). Several: GPU ``LOCAL_RANK`` when CUDA is
        there, else the CPU with gloo, so the same command runs on a laptop and on a node.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device or torch.device("cpu"))
        import torch.distributed as dist

        cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            where = torch.device("cuda", local)
        else:
            where = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), where)

    def close(self) -> None:
        """Leave the process group (at the end of a command; the launcher's processes then exit)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes (float64, on this process's device)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def share(self, value):
        """Rank 0's ``value`` on every process (a picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None) -> None:
        """Raise on every process when any of them failed a step that all must pass together.

        Used around work only some ranks do (rank 0 reserving the output): the others would
        otherwise wait forever at the next collective.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        messages: list = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is not None:
            raise error
        failed = [m for m in messages if m is not None]
        if failed:
            raise PeerFailed(failed[0])


def wrap(module: nn.Module, cluster: Cluster, fsdp: bool, bf16: bool) -> nn.Module:
    """``module`` (the loss module that holds student and teacher) ready for data-parallel training.

    FSDP2 shards every decoder block of every model inside (teacher too: it is frozen, so it has
    no gradients or optimizer state, only its shard of the weights) and then the rest as one
    group; bf16 there is FSDP's own mixed precision (bf16 compute, fp32 gradient reduction). DDP
    replicates; frozen teacher weights take no part in its gradient averaging.
    """
    if not cluster.distributed:
        return module
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(cluster.device.type, (cluster.world,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        )
        extra = {"mp_policy": policy} if policy is not None else {}
        for model in module.children():
            for block in models.decoder_blocks(model):
                fully_shard(block, mesh=mesh, **extra)
        fully_shard(module, mesh=mesh, **extra)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [cluster.device.index] if cluster.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def skip_gradient_sync(wrapped: nn.Module, skip: bool) -> None:
    """Accumulate gradients locally on all but the last micro-batch of a step (DDP and FSDP2)."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(not skip)
    elif hasattr(wrapped, "require_backward_grad_sync"):  # DDP
        wrapped.require_backward_grad_sync = not skip
