"""Point-to-point exchanges around a ring of ranks.

Each exchange sends tensors to the next rank and receives as many from the
previous one, as one ``torch.distributed.batch_isend_irecv`` batch, and
returns at once: the caller computes while the transfer runs and waits only
when it needs what arrives. With NCCL the transfers run on NCCL's own CUDA
stream, so they overlap the kernels of the current stream; waiting makes the
current stream wait for them. With gloo (CPU tensors) they run on gloo's
threads.

Every wait is bounded by the process group's ``timeout`` (of
``init_process_group`` or ``new_group``): a rank that fails, before the call
or in it, leaves its neighbours waiting for it, and under gloo they raise
once the timeout has passed (so do, in turn, the ranks waiting for them).
Under NCCL a wait does not block the host; PyTorch's NCCL watchdog ends a
transfer that outlasts the timeout (see ``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
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
        self.next_rank = (self.rank + 1) % self.world_size
        self.prev_rank = (self.rank - 1) % self.world_size
        self._next = self._global(self.next_rank)
        self._prev = self._global(self.prev_rank)

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
        return Exchange(dist.batch_isend_irecv(ops), tensors, received, self)


class Exchange:
    """A transfer in flight; :meth:`wait` returns the received tensors."""

    def __init__(self, works, sent: list[torch.Tensor], received: list[torch.Tensor], ring: Ring):
        self._works = works
        self._sent = sent  # kept alive until the transfer is done
        self._received = received
        self._ring = ring

    def wait(self) -> list[torch.Tensor]:
        try:
            for work in self._works:
                work.wait()  # bounded by the process group's timeout
        except RuntimeError as err:
            ring = self._ring
            raise RuntimeError(
                f"flashtile: rank {ring.rank} of the ring got no answer from its neighbours (ranks {ring.prev_rank} "
                f"and {ring.next_rank} of the group) within the process group's timeout, or the transfer failed: "
                f"a rank that raised or stopped leaves the others waiting ({err})") from err
        self._works, self._sent = [], []
        return self._received
