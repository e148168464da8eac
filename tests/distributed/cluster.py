"""Processes joined by a torch.distributed process group, kept for the test
session: a test sends a function to the ranks of a group of the size it wants
and gets each rank's result back (or the tracebacks of the ranks that raised).

Spawning and joining costs seconds, a case a fraction of one, hence one set
of processes for every case: the groups of fewer ranks are subgroups of the
last ranks (so that their ranks differ from the global ones)."""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# a rank left waiting for a peer that failed gives up after this long
_COLLECTIVE_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_GROUP = None  # the group of the task running on this rank


def group():
    """The process group of the task running on this rank."""
    return _GROUP


def device() -> str:
    """Where this rank's tensors live: its GPU under NCCL, else the CPU."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _worker(rank: int, world_size: int, port: int, backend: str, tasks, results) -> None:
    global _GROUP
    torch.set_num_threads(1)  # the ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
        os.environ["FLASHTILE_FP32_DOT"] = "ieee"  # fp32 products in fp32, as the oracle's
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S))
    groups = {size: dist.new_group(list(range(world_size - size, world_size))) for size in range(1, world_size)}
    groups[world_size] = None  # the default group
    while True:  # until the test session ends the process
        size, fn, kwargs = tasks.get()
        if rank < world_size - size:
            results.put((rank, True, None))  # not in this task's group
            continue
        _GROUP = groups[size]
        try:
            results.put((rank, True, fn(**kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the test
            results.put((rank, False, traceback.format_exc()))


class Cluster:
    """``world_size`` processes in one process group of ``backend``."""

    def __init__(self, world_size: int, backend: str = "gloo"):
        self.world_size, self.backend = world_size, backend
        self._procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, daemon=True,
                                   args=(rank, self.world_size, port, self.backend, self._tasks[rank], self._results))
                       for rank in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, size: int, fn, timeout: float = 2 * _COLLECTIVE_TIMEOUT_S + 60, **kwargs) -> list:
        """``fn(**kwargs)`` on every rank of the group of ``size`` ranks (``fn`` importable by
        name; :func:`group` is that group there); the results by group rank. If a rank
        raises, raises AssertionError with the tracebacks and restarts the processes at the
        next call (their state is unknown)."""
        if not 1 <= size <= self.world_size:
            import pytest

            pytest.skip(f"a group of {size} ranks; {self.world_size} processes here")
        if not self._procs:
            self._start()
        for tasks in self._tasks:
            tasks.put((size, fn, kwargs))
        results, failures = {}, []
        try:
            for _ in range(self.world_size):
                rank, ok, value = self._results.get(timeout=timeout)
                if ok:
                    results[rank] = value
                else:
                    failures.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            failures.append(f"ranks {sorted(set(range(self.world_size)) - set(results))} did not answer in {timeout} s")
        if failures:
            self.close()
            raise AssertionError("\n".join(failures))
        return [results[r] for r in range(self.world_size - size, self.world_size)]

    def close(self) -> None:
        # the ranks hold no state worth a clean exit (a rank may also be stuck waiting for a
        # peer that failed): ended at once
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            p.join()
        self._procs = []


def set_backend_env(interpret: bool) -> None:
    """Run CPU tensors through the Triton kernels in the interpreter, or through the CPU
    paths (GPU tensors run the compiled kernels)."""
    if device() == "cpu":
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"


class ScatterSequence(torch.autograd.Function):
    """The whole sequence (the same on every rank) -> this rank's shard; the gradient
    is gathered from every rank, so each rank gets the whole sequence's gradient."""

    @staticmethod
    def forward(ctx, x, dim, layout):
        from flashtile.distributed import shard

        ctx.dim, ctx.layout = dim, layout
        return shard(x, dim, dist.get_rank(_GROUP), dist.get_world_size(_GROUP), layout)

    @staticmethod
    def backward(ctx, grad):
        from flashtile.distributed import gather_sequence

        return gather_sequence(grad, ctx.dim, _GROUP, ctx.layout), None, None


class GatherSequence(torch.autograd.Function):
    """This rank's shard -> the whole sequence on every rank; the gradient (the same
    on every rank) goes back as this rank's shard of it."""

    @staticmethod
    def forward(ctx, x, dim, layout):
        from flashtile.distributed import gather_sequence

        ctx.dim, ctx.layout = dim, layout
        return gather_sequence(x, dim, _GROUP, layout)

    @staticmethod
    def backward(ctx, grad):
        from flashtile.distributed import shard

        return shard(grad, ctx.dim, dist.get_rank(_GROUP), dist.get_world_size(_GROUP), ctx.layout), None, None


def sharded(fn, layout: str, dim: int = 1):
    """``fn`` on shards as a function of whole sequences (for the accuracy rule's
    helper): ``(q, k, v) -> gather(fn(shard(q), shard(k), shard(v)))``."""
    def whole(q, k, v):
        out = fn(*(ScatterSequence.apply(t, dim, layout) for t in (q, k, v)))
        return GatherSequence.apply(out, dim, layout)
    return whole
