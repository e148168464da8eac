"""Which launch configuration a kernel runs with, and the launch itself: a
configuration forced by a tool (``force_config``), the one chosen before
for the same switches, the tuned one (with autotuning on, ``.autotune``),
or the first entry of the checked-in table (``.table``) that fits the GPU."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, NamedTuple

import torch
import triton

from . import autotune
from .device import capability_of
from .invariant import batch_invariant
from .table import LaunchConfig, launch_configs, sparse_constexprs


class KernelLaunch(NamedTuple):
    """One kernel launch as run: ``args`` the positional arguments, ``kwargs`` the
    constexprs and launch options, ``compiled`` Triton's compiled kernel (None under
    the interpreter or when not run)."""
    kernel: object
    grid: tuple
    args: tuple | object
    cfg: LaunchConfig
    kwargs: dict
    compiled: object

    def run(self) -> "KernelLaunch":
        """Launch this step through Triton's launch path; the step with its compiled kernel."""
        return self._replace(compiled=self.kernel[self.grid](*self.args, **self.kwargs))


# launch key (name, switches, ...) -> the config that ran; kernel name -> the last config that ran
_chosen: dict[tuple, LaunchConfig] = {}
_last: dict[str, LaunchConfig] = {}
# kernel name -> config forced by tools (force_config, benchmarks/tools/tune.py)
forced_configs: dict[str, LaunchConfig] = {}


def launch_kernel(name: str, kernel, grid_fn, args, constexprs: dict, tensor: torch.Tensor, block_d: int,
                  seqlens: tuple[int, int] = (0, 0), build_only: bool = False) -> "KernelLaunch":
    """Launch ``kernel`` with the first config of the table that compiles here,
    or with autotuning on (see ``.autotune``) the fastest one for this
    (GPU, head dim, dtype, switches, bucket of ``seqlens`` = (seqlen_q, seqlen_k)).
    ``args`` is a tuple, or a function of the config giving one (for arguments
    that depend on the tile sizes, such as host-built tensor descriptors).
    Block-sparse launches (SPARSE) cap the tiles at the mask's block size, of
    which they are then divisors (all are powers of two), and take no two-halves configs.
    Returns the ``KernelLaunch`` it ran; ``build_only``: the step it would run now, not run.
    In batch-invariant mode (``.invariant``) forward launches run one config list."""
    capability = capability_of(tensor.device)
    invariant = name.startswith("fwd") and batch_invariant()
    tuning = capability is not None and autotune.enabled() and not invariant
    # each call site builds ``constexprs`` in a fixed order: no need to sort it
    key = (name, block_d, tensor.dtype, capability, tuple(constexprs.items()),
           tuple(map(autotune.size_bucket, seqlens)) if tuning else None, invariant)
    if name in forced_configs:
        candidates = [forced_configs[name]]
    elif key in _chosen:
        candidates = [_chosen[key]]
    else:
        candidates = launch_configs(name, block_d, tensor.element_size(), capability)
        if invariant:
            candidates = invariant_configs(block_d, tensor.element_size(), capability)
    if constexprs.get("SPARSE"):
        # the tiles' own entries (two halves were measured on dense attention only)
        candidates = list(dict.fromkeys(
            c._replace(block_m=min(c.block_m, constexprs["SPARSE_BM"]), block_n=min(c.block_n, constexprs["SPARSE_BN"]))
            for c in candidates if not c.halves))

    if constexprs.get("PAGE_SIZE") and constexprs.get("KV_DESC"):
        # descriptors over a paged cache read tiles within one page: key tiles of at most the
        # largest power of two dividing the page
        page_tile = constexprs["PAGE_SIZE"] & -constexprs["PAGE_SIZE"]
        candidates = list(dict.fromkeys(c._replace(block_n=min(c.block_n, page_tile)) for c in candidates))

    def kwargs(cfg: LaunchConfig) -> dict:
        sparse = sparse_constexprs(name, cfg, capability) if constexprs.get("SPARSE") else {}
        halves = dict(TWO_HALVES=True) if cfg.halves and name.startswith("fwd") else {}  # a forward kernel switch
        return dict(constexprs, **sparse, **halves, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def step(cfg: LaunchConfig) -> KernelLaunch:
        return KernelLaunch(kernel, grid_fn(cfg), args(cfg) if callable(args) else args, cfg, kwargs(cfg), None)

    if build_only:  # the launch a plan replays (see LaunchPlan.check): the config chosen before, not run
        return step(candidates[0])

    if tuning and name not in forced_configs and key not in _chosen:
        disk_key = _autotune_key(name, kernel, block_d, tensor, capability, constexprs, key[-1])
        tuned = autotune.lookup(disk_key)
        if tuned is None and not torch.cuda.is_current_stream_capturing():
            tuned = autotune.tune(disk_key, autotune.search_space(candidates), lambda cfg: step(cfg).run())
        if tuned is not None:
            candidates = [tuned] + candidates
    error = None
    for cfg in candidates:
        try:
            launched = step(cfg).run()
        except triton.runtime.errors.OutOfResources as exc:  # too large for this GPU: next one
            error = exc
            continue
        if name not in forced_configs:
            _chosen[key] = cfg
        _last[name] = cfg
        return launched
    raise RuntimeError(f"flashtile: no launch configuration of kernel '{name}' fits this GPU") from error


def invariant_configs(block_d: int, elem_size: int, capability: tuple[int, int] | None) -> list[LaunchConfig]:
    """The configs of every forward launch in batch-invariant mode: those of the launch
    table's plain forward entry (``"fwd"``) for this head dim, dtype and GPU, whichever
    entry the batch's rows would pick. A row's sums depend on the key tile (the order
    of its keys) and, under a causal or window mask, on the query tile too: it decides
    which key tiles go through the masked loop, whose rounding differs from the
    unmasked one (on an H100, fixing the key tile alone left a causal sequence at head
    dim 128 different packed and alone)."""
    return launch_configs("fwd", block_d, elem_size, capability)


def _autotune_key(name, kernel, block_d, tensor, capability, constexprs, buckets) -> str:
    """Key of a tuned choice in the on-disk cache: GPU, kernel source, variant, shapes."""
    switches = hashlib.sha1(repr(tuple(constexprs.items())).encode()).hexdigest()[:12]
    source = getattr(kernel, "cache_key", "")[:12]
    gpu = torch.cuda.get_device_name(tensor.device).replace(" ", "_")
    dtype = str(tensor.dtype).removeprefix("torch.")
    return (f"{gpu}/sm{capability[0]}{capability[1]}/triton-{triton.__version__}/{name}-{source}/d{block_d}/"
            f"{dtype}/{switches}/{buckets[0]}x{buckets[1]}")



@contextlib.contextmanager
def force_config(configs: dict[str, LaunchConfig] | LaunchConfig, names=None) -> Iterator[None]:
    """Run every launch of the kernels named in ``configs`` (launch-table names such
    as ``"fwd_tma"``, ``"dq"``, ``"dkdv"``) with the given config, for tuning and
    A/B benchmarks; or ``configs`` for each of ``names``. Launch plans are not made
    while configs are forced. Restores the previous forced configs on exit."""
    if isinstance(configs, LaunchConfig):
        configs = {name: configs for name in names}
    saved = dict(forced_configs)
    forced_configs.update(configs)
    try:
        yield
    finally:
        forced_configs.clear()
        forced_configs.update(saved)


def chosen_config(name: str) -> LaunchConfig | None:
    """The config the last launch of kernel ``name`` (a launch-table name) ran with,
    or None if none ran."""
    return _last.get(name)
