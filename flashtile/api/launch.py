"""Launch the Triton kernels: output allocation, grids, strides, configs.

Tensors arrive in flash_attn layout ``(batch, seqlen, nheads, headdim)`` with
a contiguous last dimension; any other strides are passed to the kernels.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import NamedTuple

import torch
import triton

from ..kernels.backward import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from ..kernels.common import BIAS_ADD, BIAS_BOOL, BIAS_NONE
from ..kernels.configs import LaunchConfig, launch_configs, sparse_constexprs, split_dkdv
from ..kernels.forward import attn_fwd_kernel
from ..reference import AttnOptions
from . import autotune

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device`` (cached per device: asked on every call), or
    None under the interpreter and off CUDA."""
    if device.type != "cuda" or interpreting():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = _capabilities.get(index)
    if capability is None:
        capability = _capabilities[index] = torch.cuda.get_device_capability(index)
    return capability


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# A causal grid's programs carry work growing (forward, dQ) or shrinking (dK/dV) with
# the block index. Issued head after head, the grid would end on the last heads'
# heaviest blocks running alone: its last LONGEST_FIRST_WAVES x SMs programs are issued
# block by block across heads instead, heaviest first (kernels/common.py, program_tile).
# Once a head has more blocks than half the multiprocessors, its own lighter blocks fill
# in behind its heavy ones, and the order across heads costs more L2 reuse than it gains:
# H200 (docs/performance.md), +2-5% from 1k to 8k keys, -1 to -4% where a head has 128
# blocks (d128 at 16k, d256 from 8k), +2% at d64 16k.
LONGEST_FIRST_WAVES = 6
# under the interpreter: multiprocessors to assume, so that small test grids take both orders
INTERPRETER_SMS = 8


def tail_heads(num_blocks: int, num_bh: int, uneven: bool, device: torch.device) -> int:
    """``tail_bh`` of a grid of ``num_blocks`` sequence blocks x ``num_bh`` (batch, head)
    pairs: 0 unless the work per block is ``uneven`` and a head's blocks fill at most
    half the GPU."""
    if not uneven:
        return 0
    sms = sm_count(device) if device.type == "cuda" else INTERPRETER_SMS
    if num_blocks > sms // 2:
        return 0
    return min(num_bh, cdiv(LONGEST_FIRST_WAVES * sms, num_blocks))


def cdiv(a: int, b: int) -> int:
    # plain Python: triton.cdiv is a constexpr function, several times slower to call on the host
    return -(-a // b)


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """Precision of the kernels' dot products for ``dtype`` inputs. fp32 follows
    PyTorch's matmul setting: TF32 when ``torch.backends.cuda.matmul.allow_tf32``,
    else products accurate to about fp32 (relative error ~1e-6): three TF32
    products per element (the operands split into a TF32 high and low part) on
    tensor-core NVIDIA GPUs, plain fp32 elsewhere. ``FLASHTILE_FP32_DOT``
    (``ieee``, ``tf32x3`` or ``tf32``) overrides the choice."""
    if dtype != torch.float32:
        return "ieee"
    forced = os.environ.get("FLASHTILE_FP32_DOT")
    if forced:
        if forced not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"FLASHTILE_FP32_DOT must be 'ieee', 'tf32x3' or 'tf32', got {forced!r}")
        return forced
    capability = _capability(device)
    if torch.version.hip is not None or capability is None or capability[0] < 8:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def next_power_of_2(n: int) -> int:
    # plain Python, like cdiv (triton.next_power_of_2 is a constexpr function)
    return 1 << max(0, n - 1).bit_length()


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


_chosen: dict[tuple, LaunchConfig] = {}
# kernel name -> config forced by tuning scripts (see benchmarks/tune.py)
forced_configs: dict[str, LaunchConfig] = {}


def _launch(name: str, kernel, grid_fn, args, constexprs: dict, tensor: torch.Tensor, block_d: int,
            seqlens: tuple[int, int] = (0, 0), dry: bool = False) -> "_Step":
    """Launch ``kernel`` with the first config of the table that compiles here,
    or with autotuning on (see :mod:`.autotune`) the fastest one for this
    (GPU, head dim, dtype, switches, bucket of ``seqlens`` = (seqlen_q, seqlen_k)).
    ``args`` is a tuple, or a function of the config giving one (for arguments
    that depend on the tile sizes, such as host-built tensor descriptors).
    Block-sparse launches (SPARSE) cap the tiles at the mask's block size, of
    which they are then divisors (all are powers of two), and take no two-halves configs.
    Returns the :class:`_Step` it ran; ``dry``: the step it would run now, not run."""
    capability = _capability(tensor.device)
    tuning = capability is not None and autotune.enabled()
    # each call site builds ``constexprs`` in a fixed order: no need to sort it
    key = (name, block_d, tensor.dtype, capability, tuple(constexprs.items()),
           tuple(map(autotune.size_bucket, seqlens)) if tuning else None)
    if name in forced_configs:
        candidates = [forced_configs[name]]
    elif key in _chosen:
        candidates = [_chosen[key]]
    else:
        candidates = launch_configs(name, block_d, tensor.element_size(), capability)
    if constexprs.get("SPARSE"):
        # the tiles' own entries (two halves were measured on dense attention only)
        candidates = list(dict.fromkeys(
            c._replace(block_m=min(c.block_m, constexprs["SPARSE_BM"]), block_n=min(c.block_n, constexprs["SPARSE_BN"]))
            for c in candidates if not c.halves))

    def kwargs(cfg: LaunchConfig) -> dict:
        sparse = sparse_constexprs(name, cfg, capability) if constexprs.get("SPARSE") else {}
        halves = dict(HALVES=True) if cfg.halves and name.startswith("fwd") else {}  # a forward kernel switch
        return dict(constexprs, **sparse, **halves, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def step(cfg: LaunchConfig) -> _Step:
        return _Step(kernel, grid_fn(cfg), args(cfg) if callable(args) else args, cfg, kwargs(cfg), None)

    if dry:  # the launch a plan replays (see _Plan.check): the config chosen before, not run
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
        return launched
    raise RuntimeError(f"flashtile: no launch configuration of kernel '{name}' fits this GPU") from error


def _autotune_key(name, kernel, block_d, tensor, capability, constexprs, buckets) -> str:
    """Key of a tuned choice in the on-disk cache: GPU, kernel source, variant, shapes."""
    switches = hashlib.sha1(repr(tuple(constexprs.items())).encode()).hexdigest()[:12]
    source = getattr(kernel, "cache_key", "")[:12]
    gpu = torch.cuda.get_device_name(tensor.device).replace(" ", "_")
    dtype = str(tensor.dtype).removeprefix("torch.")
    return (f"{gpu}/sm{capability[0]}{capability[1]}/triton-{triton.__version__}/{name}-{source}/d{block_d}/"
            f"{dtype}/{switches}/{buckets[0]}x{buckets[1]}")


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value == "1"


def _tma_compatible(*tensors: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and all(s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def _scratch_allocator(size: int, align: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _keys_per_row(lay: "_Layout", opts: AttnOptions) -> int:
    """About how many keys one query row attends to."""
    keys = lay.seqlen_k
    if opts.window_left >= 0 and opts.window_right >= 0:
        keys = min(keys, opts.window_left + opts.window_right + 1)
    elif opts.window_right >= 0 or opts.window_left >= 0:
        keys //= 2
    return keys


def _descriptor_mode(env_name: str, default: int, keys_per_row: int, min_keys: int, rows: int,
                     *tensors: torch.Tensor) -> int:
    """0: pointer loads; 1: tensor descriptors built in the kernel; 2: built on the host.
    On Hopper, ``default`` once a query row sees ``min_keys`` keys or more (shorter
    rows: pointer loads measured as fast or faster); ``env_name`` (0, 1 or 2)
    overrides, for experiments. Unaligned tensors, and descriptors over fewer
    than TMA_MIN_ROWS rows (``rows``; a length of 1 becomes a compile-time
    constant that Triton's descriptor lowering rejects), take pointer loads."""
    capability = _capability(tensors[0].device)
    hopper = capability is not None and capability[0] >= 9
    env = os.environ.get(env_name)
    if env is None:
        mode = default if hopper and keys_per_row >= min_keys else 0
    else:
        mode = int(env)
    if rows < TMA_MIN_ROWS or not _tma_compatible(*tensors):
        mode = 0
    if mode == 1 and tensors[0].is_cuda:
        # device-side descriptors live in a small global scratch buffer. Triton keeps the
        # allocator per thread, and autograd runs the backward in a thread of its own: set it
        # on every call rather than once.
        triton.set_allocator(_scratch_allocator)
    return mode


def _forward_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys_per_row: int) -> dict:
    """KV_DESC (see :func:`_descriptor_mode`, FLASHTILE_FWD_TMA) and WARP_SPECIALIZE
    (FLASHTILE_FWD_WS = 0 or 1) for the forward kernel."""
    capability = _capability(q.device)
    hopper = capability is not None and capability[0] >= 9
    warp_spec = _env_flag("FLASHTILE_FWD_WS")
    warp_spec = hopper and DEFAULT_FWD_WS if warp_spec is None else warp_spec and capability is not None
    kv_desc = _descriptor_mode("FLASHTILE_FWD_TMA", DEFAULT_FWD_TMA, keys_per_row, FWD_TMA_MIN_KEYS, k.shape[-3],
                               k, v)
    if q.element_size() > 2 and "FLASHTILE_FWD_TMA" not in os.environ:
        # fp32 through descriptors measured 32x slower than through pointer loads on an H200
        # (27 ms at 2k keys against 0.84 ms at 1k, docs/performance.md)
        kv_desc = 0
    return dict(KV_DESC=kv_desc, WARP_SPECIALIZE=bool(warp_spec))


# measured on an H100 (docs/performance.md): in-kernel descriptors pay from about 2k keys
# per row (forward +5-16%, backward up to +17%), warp specialisation does not; host-built
# descriptors are not better overall. The backward's thresholds:
DEFAULT_FWD_TMA = 1
DEFAULT_BWD_TMA = 1
TMA_MIN_KEYS = 2048
# at head dims above 64 descriptors gain from 1k keys per row (H200, 1k non-causal and 2k causal:
# forward +5-13%, backward +1-20%); head dim 64 loses up to 11% there (docs/performance.md)
TMA_MIN_KEYS_WIDE = 1024
# the forward, with the two-halves tiles that descriptors allow, from 1k keys at every head dim
# (H200, d64 full 1k: 383 against 368 TFLOP/s; causal 2k: 347 against 350, docs/performance.md)
FWD_TMA_MIN_KEYS = 1024
# forward rows that see fewer keys than this take the "_short" launch-table entries, per
# mask ("" = full attention): causal below 2k keys a row (seqlen < 4k), full below 8k
SHORT_KEYS = {"_causal": 2048, "": 8192}
# every launch-table name the forward launcher can ask for (tools and tests force configs on all)
FORWARD_NAMES = [f"fwd{tma}{mask}{short}" for tma in ("", "_tma") for mask in ("", "_causal", "_window")
                 for short in ("", "_short")]
TMA_MIN_ROWS = 128
DEFAULT_FWD_WS = False


# Fixed softmax offset (cosine-similarity attention). P = exp2(s - offset) with the offset
# FIXED_MAX_HEADROOM (log2 units) below the score bound is at most 2**14: P cast to fp16 for
# the PV product cannot overflow, even when scores exceed their bound by up to 1.1 (natural
# units: rounding, inputs normalised by the caller). Below, fp16 keeps full precision down
# to 2**-14: scores from bound down to -bound fit (about) when 2 * bound * log2(e) <= 29,
# i.e. bound <= 10 (scale 10, one group). Beyond that an fp16 row whose visible keys all score
# far below the bound would lose its probabilities to underflow, so fp16 takes the running
# max instead (exact, also no overflow). bf16 and fp32 have fp32's exponent range: no limit.
FIXED_MAX_HEADROOM = 14.0
FIXED_MAX_FP16_RANGE = 29.0


def fixed_offset(opts: AttnOptions, dtype: torch.dtype) -> float | None:
    """The forward kernel's fixed softmax offset (log2 units), or None for the running row max."""
    if opts.fixed_max is None:
        return None
    if dtype == torch.float16 and 2 * opts.fixed_max * LOG2E > FIXED_MAX_FP16_RANGE:
        return None
    return opts.fixed_max * LOG2E - FIXED_MAX_HEADROOM


def _bsh(t: torch.Tensor, varlen: bool = False) -> tuple[int, int, int]:
    """Batch, sequence and head strides of a (batch, seqlen, heads, dim) tensor;
    for a packed varlen tensor (1, total, heads, dim) the batch stride is 0."""
    batch, seq, head = t.stride()[:3]
    return 0 if varlen else batch, seq, head


def _tile_lists(lists: tuple | None, q: torch.Tensor) -> tuple:
    """The kernels' tile-list arguments: ``lists`` (from :func:`_sparse_args`), or
    without block sparsity q for the unused pointers."""
    return (q, q, q, 0, 0, 0, 0) if lists is None else lists


def _sparse_args(full: torch.Tensor, part: torch.Tensor, patterns: torch.Tensor) -> tuple:
    """Kernel arguments of block-sparse tile lists ``(B, H, n_blocks, width)``: the
    lists, the patterns, the list-row strides of batch and head (0 where
    broadcast) and the two row lengths."""
    b, h, n_blocks, _ = full.shape
    return (full, part, patterns, h * n_blocks if b > 1 else 0, n_blocks if h > 1 else 0,
            full.shape[-1], part.shape[-1])


def _option_tensors(q: torch.Tensor, opts: AttnOptions, cu_seqlens_q, cu_seqlens_k) -> tuple:
    """The kernels' per-call pointer arguments besides the attention tensors:
    (cu_seqlens_q, cu_seqlens_k, bias, alibi); unused ones get q."""
    bias = opts.bias
    if bias is None:
        bias = q
    elif bias.dtype == torch.bool:
        bias = bias.view(torch.uint8)
    return (q if cu_seqlens_q is None else cu_seqlens_q, q if cu_seqlens_k is None else cu_seqlens_k, bias,
            q if opts.alibi is None else opts.alibi)


class _Layout:
    """Batch geometry, feature switches and the score arguments shared by the forward, dQ and dK/dV kernels:
    everything but the tensors themselves, so a launch plan (:class:`_Plan`) can keep it.
    ``sparse``: the :class:`~flashtile.api.block_mask.BlockMask` of block-sparse attention, or None."""

    def __init__(self, q, k, opts: AttnOptions, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 sparse=None):
        self.varlen = cu_seqlens_q is not None
        self.batch = cu_seqlens_q.numel() - 1 if self.varlen else q.shape[0]
        self.nheads, self.nheads_k = q.shape[2], k.shape[2]
        self.seqlen_q = max_seqlen_q if self.varlen else q.shape[1]
        self.seqlen_k = max_seqlen_k if self.varlen else k.shape[1]
        bias = opts.bias
        if bias is None:
            self.bias_strides, bias_kind, bias_rows = (0, 0, 0, 0), BIAS_NONE.value, False
        else:
            self.bias_strides = bias.stride()
            bias_kind = (BIAS_BOOL if bias.dtype == torch.bool else BIAS_ADD).value
            bias_rows = bias.stride(2) != 0 and bias.shape[2] > 1
        self.alibi_stride = 0 if opts.alibi is None else opts.alibi.stride(0)
        self.const = dict(
            HEAD_DIM=q.shape[-1], BLOCK_D=_block_d(q.shape[-1]),
            MASK_LEFT=opts.window_left >= 0, MASK_RIGHT=opts.window_right >= 0,
            SOFTCAP=opts.softcap > 0, HAS_ALIBI=opts.alibi is not None,
            BIAS_KIND=bias_kind, BIAS_ROWS=bias_rows, DROPOUT=opts.dropout_p > 0, IS_VARLEN=self.varlen,
            UPCAST=interpreting() and q.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(q.dtype, q.device),
        )
        softcap = opts.softcap if opts.softcap > 0 else 1.0
        # argument groups, in the kernels' order: (max_seqlen_q, max_seqlen_k, diag_offset, window_left,
        # window_right), (qk_scale, softcap_in, softcap_out), (dropout_p, dropout_scale); the seed is per call
        self.positions = (self.seqlen_q, self.seqlen_k, opts.diag, opts.window_left, opts.window_right)
        self.scores = (opts.softmax_scale * LOG2E, opts.softmax_scale / softcap, softcap * LOG2E)
        self.dropout = (opts.dropout_p, 1.0 / (1.0 - opts.dropout_p))
        # forward only: the fixed softmax offset (log2 units) that replaces the running row max
        self.fixed_max = fixed_offset(opts, q.dtype)
        # block-sparse tile lists: (forward and dQ kernels), (dK/dV kernel); None without (see _tile_lists)
        self.sparse_fwd = self.sparse_bwd = None
        self.const["SPARSE"] = sparse is not None
        if sparse is not None:
            lists = sparse.kernel_lists()
            self.sparse_fwd = _sparse_args(lists.fwd_full, lists.fwd_part, lists.pattern_bits)
            self.sparse_bwd = _sparse_args(lists.bwd_full, lists.bwd_part, lists.pattern_bits)
            self.const["SPARSE_BM"], self.const["SPARSE_BN"] = sparse.block_size

    def lse_strides(self, lse: torch.Tensor) -> tuple[int, int]:
        return 0 if self.varlen else lse.stride(0), lse.stride(1)


# ---------------------------------------------------------------- launch plans
# A call's host work (layout, switches, launch-table lookup, Triton's binding and
# specialisation of some 60 arguments) depends only on the shapes, strides, dtypes and
# 16-byte alignment of its tensors, its options and the environment. The first call of
# each such signature records its launches as a plan; later calls rebuild only the
# argument lists around their own tensors and call the compiled kernels' launchers
# directly (docs/performance.md, host cost per call).

class _Step(NamedTuple):
    """One kernel launch as run: ``args`` the positional arguments, ``kwargs`` the
    constexprs and launch options, ``compiled`` Triton's compiled kernel (None under
    the interpreter or when not run)."""
    kernel: object
    grid: tuple
    args: tuple | object
    cfg: LaunchConfig
    kwargs: dict
    compiled: object

    def run(self) -> "_Step":
        """Launch this step through Triton's launch path; the step with its compiled kernel."""
        return self._replace(compiled=self.kernel[self.grid](*self.args, **self.kwargs))


# The FLASHTILE_* switches of the environment (experiments: FLASHTILE_FWD_TMA, _FWD_WS,
# _BWD_TMA, _BWD_SPLIT, _FP32_DOT, _AUTOTUNE) are read when a plan is made: after changing one in a
# running process, clear_caches().
_plans: dict[tuple, "_Plan"] = {}
# plan key -> what a launcher derived from the call's layout before its launches (decoding:
# tiles and split count), kept beside the plan so that a replayed call skips that too
plan_setups: dict[tuple, tuple] = {}
# tests set this: every plan hit also builds its launches the slow way and compares them
check_plans = False


def clear_caches() -> None:
    """Forget the chosen launch configs and the launch plans."""
    _chosen.clear()
    _plans.clear()
    plan_setups.clear()


def _tensor_key(t: torch.Tensor | None):
    return None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() % 16)


def layout_key(kind: str, tensors: tuple, extra: tuple) -> tuple:
    """The plan key of a call of ``kind``: everything its launches depend on besides
    its tensors' data, given its scalars ``extra``. ``tensors``: the call's inputs;
    outputs it allocates itself have the layout its inputs imply and the caching
    allocator's alignment."""
    first = tensors[0]
    # Triton launches on the current device; fp32 dot products follow PyTorch's TF32 setting
    device = torch.cuda.current_device() if first.is_cuda else None
    tf32 = torch.backends.cuda.matmul.allow_tf32 if first.dtype == torch.float32 else None
    return (kind, autotune._enabled, device, tf32, first.device, *map(_tensor_key, tensors), *extra)


def _plan_key(kind: str, tensors: tuple, opts: AttnOptions, extra: tuple) -> tuple | None:
    """:func:`layout_key` of an attention call with options ``opts``, or None for
    calls that are not planned (block-sparse, launch configs forced by tools, seeds
    beyond 32 bits)."""
    if forced_configs or opts.block_mask is not None or not -2**31 <= opts.seed < 2**31:
        return None
    # Triton specialises integer arguments equal to 1 or divisible by 16: the seed's class
    seed = (opts.seed == 1, opts.seed % 16 == 0)
    return layout_key(kind, tensors, (opts[:5], _tensor_key(opts.alibi), _tensor_key(opts.bias), opts.dropout_p,
                                      seed, opts[9:13], *extra))


class _Plan:
    """The launches of one call signature (see :func:`layout_key`): ``steps`` as run by
    the first call, ``builders`` giving each step's arguments from a call's values
    (``builder(cfg, call)``)."""

    def __init__(self, steps: list[_Step], builders: list):
        self.launches = []
        for step, build in zip(steps, builders):
            tail = ()
            if step.compiled is not None:
                # the compiled launcher takes every parameter in signature order, constexprs included
                params = step.kernel.params[len(step.args):]
                tail = tuple(step.kwargs[p.name] if p.name in step.kwargs else p.default for p in params)
            grid = tuple(step.grid) + (1,) * (3 - len(step.grid))
            # without the first call's arguments: a plan keeps no tensor alive
            self.launches.append((step._replace(args=None), build, grid, tail))
        self.allocator = any(s.kwargs.get("KV_DESC") == 1 or s.kwargs.get("USE_DESC") for s in steps)

    def run(self, call: tuple) -> None:
        from triton import knobs
        from triton.runtime import driver

        stream = None
        for step, build, grid, tail in self.launches:
            args = build(step.cfg, call)
            compiled = step.compiled
            # launch hooks (profilers): Triton's own launch path calls them
            if compiled is None or getattr(knobs.runtime.launch_enter_hook, "calls", knobs.runtime.launch_enter_hook):
                step.kernel[step.grid](*args, **step.kwargs)
                continue
            if stream is None:
                if self.allocator:  # in-kernel descriptors' scratch (see _descriptor_mode)
                    triton.set_allocator(_scratch_allocator)
                stream = driver.active.get_current_stream(driver.active.get_current_device())
            compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)

    def check(self, rebuilt: list[_Step], call: tuple) -> None:
        """Raise unless ``rebuilt`` (the steps built the slow way for ``call``) launch
        what this plan launches for it."""
        assert len(rebuilt) == len(self.launches), "plan: number of launches"
        for (step, build, _, _), new in zip(self.launches, rebuilt):
            args, new_args = build(step.cfg, call), new.args
            differ = [i for i, (a, b) in enumerate(zip(args, new_args))
                      if not (a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)
                              else type(a) is type(b) and a == b)]
            same = (step.kernel is new.kernel and tuple(step.grid) == tuple(new.grid) and step.cfg == new.cfg
                    and step.kwargs == new.kwargs and len(args) == len(new_args) and not differ)
            assert same, (f"the plan of {step.kernel.__name__} differs from the launch built for this call "
                          f"(arguments {differ}: {[args[i] for i in differ]} / {[new_args[i] for i in differ]})")


def _run_planned(key: tuple | None, call: tuple, make_steps) -> None:
    """Replay the plan of ``key`` for ``call``, or run the launches that
    ``make_steps(dry=False)`` builds and keep them as the plan of ``key`` (None: no plan).
    With ``check_plans``, a replay is compared with ``make_steps(dry=True)``."""
    plan = _plans.get(key) if key is not None else None
    if plan is not None:
        plan.run(call)
        if check_plans:
            plan.check(make_steps(dry=True)[0], call)
        return
    steps, builders = make_steps(dry=False)
    if key is not None:
        _plans[key] = _Plan(steps, builders)


def attention_forward(q, k, v, opts: AttnOptions, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                      max_seqlen_k=0, sparse=None):
    """Returns (out, lse): out like q, lse (batch, nheads, seqlen_q) fp32.

    Varlen: q (total_q, nheads, d), k/v (total_k, nheads_k, d) given with
    int32 ``cu_seqlens_q/k``; lse is then (nheads, total_q). ``sparse``: a
    ``BlockMask`` (block-sparse attention; not with varlen).
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), device=q.device, dtype=torch.float32)
    call = (q, k, v, out, lse, *_option_tensors(q, opts, cu_seqlens_q, cu_seqlens_k), opts.seed)
    key = None if sparse is not None else _plan_key(
        "fwd", (q, k, v, cu_seqlens_q, cu_seqlens_k), opts, (max_seqlen_q, max_seqlen_k))
    _run_planned(key, call, lambda dry: _forward_steps(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                      max_seqlen_k, sparse, call, dry))
    if varlen:
        return out.squeeze(0), lse.squeeze(0)
    return out, lse


def _forward_steps(q, k, v, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse, call, dry):
    """The forward launch, run (or with ``dry`` only built) for ``call``: ([step], [builder])."""
    lay = _Layout(q, k, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse)
    varlen = lay.varlen
    keys_per_row = _keys_per_row(lay, opts)
    const = lay.const | dict(FIXED_MAX=lay.fixed_max is not None) | _forward_features(q, k, v, keys_per_row)
    block_d = const["BLOCK_D"]
    # launch-table names: "_tma" with descriptors, "_causal" for a causal mask alone, "_window"
    # with a left window bound, "_short" when the rows see fewer than SHORT_KEYS keys
    mask = "_window" if const["MASK_LEFT"] else "_causal" if const["MASK_RIGHT"] else ""
    causal = mask == "_causal"
    name = ("fwd_tma" if const["KV_DESC"] else "fwd") + mask
    if keys_per_row < SHORT_KEYS.get(mask, 0):
        name += "_short"
    out, lse = call[3], call[4]
    before_seed = (*_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(out, varlen), *lay.lse_strides(lse),
                   *lay.bias_strides, lay.alibi_stride, lay.nheads, lay.nheads // lay.nheads_k, *lay.positions,
                   *lay.scores, *lay.dropout)
    fixed_max = 0.0 if lay.fixed_max is None else lay.fixed_max
    host_desc = const["KV_DESC"] == 2

    def build(cfg, call):
        q, k, v, out, lse, cu_q, cu_k, bias, alibi, seed = call
        if host_desc:
            from triton.tools.tensor_descriptor import TensorDescriptor

            block = [1, cfg.block_n, 1, block_d]
            k, v = (TensorDescriptor(t, list(t.shape), list(t.stride()), block) for t in (k, v))
        return (q, k, v, out, lse, cu_q, cu_k, bias, alibi, *before_seed, seed, fixed_max,
                *_tile_lists(lay.sparse_fwd, q), tail_heads(cdiv(lay.seqlen_q, cfg.block_m), lay.batch * lay.nheads, causal, q.device))

    step = _launch(name, attn_fwd_kernel, lambda c: (cdiv(lay.seqlen_q, c.block_m) * lay.batch * lay.nheads,),
                   lambda cfg: build(cfg, call), const, q, block_d, (lay.seqlen_q, lay.seqlen_k), dry=dry)
    return [step], [build]


def attention_backward(dout, q, k, v, out, lse, opts: AttnOptions, bias_grad: bool = False,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, sparse=None):
    """Returns (dq, dk, dv, dbias) shaped and typed like (q, k, v); dbias is the fp32
    gradient of ``opts.bias`` before broadcast reduction, (batch, nheads, seqlen_q,
    seqlen_k), or None unless ``bias_grad``. ``sparse``: as in :func:`attention_forward`."""
    varlen = cu_seqlens_q is not None
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if varlen:
        q, k, v, out, dout, lse = (t.unsqueeze(0) for t in (q, k, v, out, dout, lse))
    # rowsum(dO * O) per query row, in lse's layout: written by the dQ kernel, read by dK/dV
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias = None
    if bias_grad:
        batch = cu_seqlens_q.numel() - 1 if varlen else q.shape[0]
        shape = (batch, q.shape[2], max_seqlen_q if varlen else q.shape[1], max_seqlen_k if varlen else k.shape[1])
        dbias = torch.zeros(shape, device=q.device, dtype=torch.float32)
    call = (q, k, v, dout, out, lse, delta, dq, dk, dv, q if dbias is None else dbias,
            *_option_tensors(q, opts, cu_seqlens_q, cu_seqlens_k), opts.seed)
    key = None if sparse is not None else _plan_key(
        "bwd", (q, k, v, dout, out, lse, cu_seqlens_q, cu_seqlens_k), opts,
        (max_seqlen_q, max_seqlen_k, bias_grad))
    _run_planned(key, call, lambda dry: _backward_steps(q, k, v, opts, bias_grad, cu_seqlens_q, cu_seqlens_k,
                                                       max_seqlen_q, max_seqlen_k, sparse, call, dry))
    if varlen:
        dq, dk, dv = dq.squeeze(0), dk.squeeze(0), dv.squeeze(0)
    return dq, dk, dv, dbias


def _backward_steps(q, k, v, opts, bias_grad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse,
                    call, dry):
    """The dQ and dK/dV launches, run (or with ``dry`` only built) for ``call``: (steps, builders)."""
    lay = _Layout(q, k, opts, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sparse)
    varlen = lay.varlen
    dout, out, lse, dq, dk, dv, dbias = call[3], call[4], call[5], call[7], call[8], call[9], call[10]
    # tensor descriptors (in the kernel) for Q/dO in dK/dV and K/V in dQ: FLASHTILE_BWD_TMA = 0 or 1
    min_keys = TMA_MIN_KEYS if q.shape[-1] <= 64 else TMA_MIN_KEYS_WIDE
    use_desc = _descriptor_mode("FLASHTILE_BWD_TMA", DEFAULT_BWD_TMA, _keys_per_row(lay, opts), min_keys,
                                min(q.shape[1], k.shape[1]), q, k, v, dout) == 1
    const = lay.const | dict(USE_DESC=use_desc)
    block_d = const["BLOCK_D"]
    nheads, nheads_k = lay.nheads, lay.nheads_k
    dbias_strides = dbias.stride() if bias_grad else (0, 0, 0, 0)
    scale = opts.softmax_scale
    common = (*lay.lse_strides(lse), *lay.bias_strides)
    causal = const["MASK_RIGHT"] and not const["MASK_LEFT"]
    # launch-table names: the kernel, "_tma" with descriptors, "_causal" for a causal mask alone
    suffix = ("_tma" if use_desc else "") + ("_causal" if causal else "")
    dq_scalars = (*_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen), *_bsh(out, varlen),
                  *_bsh(dq, varlen), *common, lay.alibi_stride, nheads, nheads // nheads_k, *lay.positions, scale,
                  *lay.scores, *lay.dropout)
    dkdv_scalars = (*_bsh(q, varlen), *_bsh(k, varlen), *_bsh(v, varlen), *_bsh(dout, varlen), *_bsh(dk, varlen),
                    *_bsh(dv, varlen), *common, *dbias_strides, lay.alibi_stride, nheads_k, nheads // nheads_k,
                    *lay.positions, scale, *lay.scores, *lay.dropout)

    def build_dq(cfg, call):
        q, k, v, dout, out, lse, delta, dq, _, _, _, cu_q, cu_k, bias, alibi, seed = call
        return (q, k, v, dout, out, dq, lse, delta, cu_q, cu_k, bias, alibi, *dq_scalars, seed,
                *_tile_lists(lay.sparse_fwd, q),
                tail_heads(cdiv(lay.seqlen_q, cfg.block_m), lay.batch * nheads, causal, q.device))

    def build_dkdv(cfg, call):
        q, k, v, dout, _, lse, delta, _, dk, dv, dbias, cu_q, cu_k, bias, alibi, seed = call
        return (q, k, v, dout, dk, dv, lse, delta, cu_q, cu_k, bias, dbias, alibi, *dkdv_scalars, seed,
                *_tile_lists(lay.sparse_bwd, q),
                tail_heads(cdiv(lay.seqlen_k, cfg.block_n), lay.batch * nheads_k, causal, q.device))

    seqlens = (lay.seqlen_q, lay.seqlen_k)
    step_dq = _launch("dq" + suffix, attn_bwd_dq_kernel,
                      lambda c: (cdiv(lay.seqlen_q, c.block_m) * lay.batch * nheads,), lambda cfg: build_dq(cfg, call), const, q, block_d, seqlens, dry=dry)
    # dK and dV together, or (FLASHTILE_BWD_SPLIT = 1, by default where the launch table says so)
    # in two launches, dV first: PART 1 (dV) does not need the dQ kernel's delta
    split = _env_flag("FLASHTILE_BWD_SPLIT")
    if split is None:
        split = split_dkdv(block_d, q.element_size(), _capability(q.device))
    parts = [("dv", 1), ("dk", 2)] if split else [("dkdv", 0)]
    steps = [step_dq] + [
        _launch(name + suffix, attn_bwd_dkdv_kernel, lambda c: (cdiv(lay.seqlen_k, c.block_n) * lay.batch * nheads_k,),
                lambda cfg: build_dkdv(cfg, call), const | dict(BIAS_GRAD=bias_grad and part != 1, PART=part), q,
                block_d, seqlens, dry=dry)
        for name, part in parts]
    return steps, [build_dq] + [build_dkdv] * len(parts)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
