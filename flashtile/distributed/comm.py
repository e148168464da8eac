"""Point-to-point exchanges around a ring of ranks.

Each exchange sends tensors to the next rank and receives as many from the
previous one, as one ``torch.distributed.batch_isend_irecv`` batch, and
returns at once: the caller computes while the transfer runs and waits only
when it needs what arrives. With NCCL the transfers run on NCCL's own CUDA
stream, so they overlap the kernels of the current stream; waiting makes the
current stream wait for them. With gloo (CPU tensors) they run on gloo's
threads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Ring:
    """The ranks of ``group`` as a ring: rank ``r`` sends to ``r + 1`` and
    receives from ``r - 1`` (mod the world size)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._next = self._global((self.rank + 1) % self.world_size)
        self._prev = self._global((self.rank - 1) % self.world_size)

    def _global(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def exchange(self, tensors: list[torch.Tensor]) -> Exchange:
        """Start sending ``tensors`` to the next rank and receiving tensors of the
        same shapes and dtypes from the previous one."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self._next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group) for t in received]
        return Exchange(dist.batch_isend_irecv(ops), tensors, received)


class Exchange:
    """A transfer in flight; :meth:`wait` returns the received tensors."""

    def __init__(self, works, sent: list[torch.Tensor], received: list[torch.Tensor]):
        self._works = works
        self._sent = sent  # kept alive until the transfer is done
        self._received = received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received
