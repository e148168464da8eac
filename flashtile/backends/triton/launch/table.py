"""Launch configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel.

Chosen from a table, never by run-time autotuning, so a first call costs one
compile. Keys are (architecture family, kernel, padded head dim) and the
element size of the inputs; each entry is a list tried in order, the later
ones being smaller fallbacks used if the compiler reports that a config does
not fit (shared memory or registers) on the GPU at hand.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class LaunchConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # forward kernel: the query block as two halves of block_m / 2 rows whose
    # softmax and P V products alternate, so that matmuls overlap the element-wise
    # work (kernels/forward.py)
    halves: bool = False

    @classmethod
    def parse(cls, text: str) -> "LaunchConfig":
        """``BLOCK_MxBLOCK_NxWARPSxSTAGES``, then ``h`` for two halves: e.g. ``256x64x8x3h``."""
        match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)(h?)", text)
        if match is None:
            raise ValueError(f"launch config {text!r} is not BLOCK_MxBLOCK_NxWARPSxSTAGES[h]")
        m, n, w, st, halves = match.groups()
        return cls(int(m), int(n), int(w), int(st), halves=bool(halves))


# Hopper (sm90), 2-byte inputs: each entry the best of a sweep (benchmarks/tools/tune.py;
# docs/experiments/2026-11-22-h100-kernels.md, 2026-11-23-h200-host-tiles.md).
# "fwd_tma" is the forward kernel reading K/V through tensor descriptors: the
# bulk copies free registers, so 128x128 tiles win there.
_SM90 = {
    # two halves (halves=True) let a half's P V product run under the other half's softmax
    # (docs/experiments/2026-12-01-halves-schedule.md)
    # head dim 64: 128 x 64 tiles on 8 warps measured 1.06-1.46x the two halves of 128 x 128
    # (H100, 2k-16k, full and causal; docs/experiments/2026-12-07-batch-invariant-cost.md)
    "fwd_tma": {
        64: [LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 128, 4, 3, halves=True), LaunchConfig(64, 64, 4, 2)],
        128: [LaunchConfig(128, 128, 8, 3), LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
        256: [LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2)],
    },
    # full attention, rows of fewer than 8k keys (from 16k the 128 x 128 tiles win again)
    "fwd_tma_short": {
        128: [LaunchConfig(256, 64, 8, 3, halves=True), LaunchConfig(128, 128, 8, 3), LaunchConfig(64, 64, 4, 2)],
    },
    # sliding windows: halves measured only without one
    "fwd_tma_window": {
        64: [LaunchConfig(128, 128, 4, 3), LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
    },
    "fwd": {
        64: [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
        128: [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
        256: [LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2)],
    },
    # causal rows of fewer than 1k keys (longer ones take descriptors): smaller query
    # blocks waste less of the diagonal
    "fwd_causal": {
        64: [LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
        128: [LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
    },
    # causal rows of 1k-2k keys through descriptors: the diagonal is a large share of the
    # work there, so smaller tiles win; from 4k the 128 x 128 tiles win again
    "fwd_tma_causal_short": {
        128: [LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 128, 8, 3), LaunchConfig(64, 64, 4, 2)],
    },
    "dkdv": {
        64: [LaunchConfig(64, 64, 4, 3), LaunchConfig(32, 128, 4, 4), LaunchConfig(32, 64, 4, 2)],
        128: [LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 64, 4, 2)],
        256: [LaunchConfig(64, 64, 8, 2), LaunchConfig(32, 64, 8, 2)],
    },
    # with descriptors (rows of 2k keys and more); head dims not listed take the
    # pointer-load kernel's entry
    "dkdv_tma": {
        64: [LaunchConfig(32, 128, 4, 4), LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 64, 4, 2)],
    },
    "dkdv_tma_causal": {
        64: [LaunchConfig(128, 64, 4, 2), LaunchConfig(32, 128, 4, 4), LaunchConfig(32, 64, 4, 2)],
    },
    # dK and dV in two launches of the dK/dV kernel (its PART switch), one accumulator each:
    # the head dims listed here take them. At d256 the joint kernel's two accumulators
    # spill; apart, each launch fits its registers. 128-key tiles, so that each program's
    # reads of Q and dO serve enough products (docs/experiments/2026-12-02-launch-plans-1k-forward.md)
    "dv": {
        256: [LaunchConfig(64, 128, 8, 2), LaunchConfig(32, 128, 8, 2), LaunchConfig(32, 64, 4, 2)],
    },
    "dk": {
        256: [LaunchConfig(32, 128, 8, 3), LaunchConfig(32, 128, 8, 2), LaunchConfig(32, 64, 4, 2)],
    },
    "dq": {
        64: [LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2)],
        128: [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 32, 4, 2)],
        256: [LaunchConfig(128, 32, 8, 2), LaunchConfig(64, 32, 4, 2)],
    },
    "dq_tma": {
        256: [LaunchConfig(128, 32, 8, 3), LaunchConfig(128, 32, 8, 2), LaunchConfig(64, 32, 4, 2)],
    },
}

# Hopper, 4-byte inputs (dot products as three TF32 products, see device.dot_precision);
# swept at seqlen 4096 (docs/experiments/2026-11-22-cosine-sim-block-sparse.md). Other
# head dims: the 2-byte table's tiles halved.
_SM90_FP32 = {
    "fwd": {64: [LaunchConfig(128, 32, 4, 3)], 128: [LaunchConfig(32, 64, 4, 2)]},
    "dkdv": {64: [LaunchConfig(64, 32, 4, 2)], 128: [LaunchConfig(32, 32, 4, 2)]},
    "dq": {64: [LaunchConfig(32, 64, 4, 3)], 128: [LaunchConfig(32, 32, 4, 2)]},
}

# Hopper, 1-byte (FP8) inputs, the forward kernel: the 2-byte entries' tiles (two halves of
# 256 x 64 at head dim 128) spill registers with FP8's extra work (184 B of stack, sm90
# compile), these do not or least; masked launches (causal, window) carry more code and take
# 64-key tiles (docs/experiments/2026-12-07-fp8-forward.md). Chosen by compiling; at head dim
# 128 the unmasked entry by timing (H100: 128 x 128 tiles in 3 stages 1.18x the 2-stage ones
# at 4k and 16k; benchmarks/tools/fp8_sweep.py), the others not yet timed.
_SM90_FP8_FWD = {
    64: [LaunchConfig(128, 128, 8, 3), LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 2)],
    128: [LaunchConfig(128, 128, 8, 3), LaunchConfig(128, 128, 8, 2), LaunchConfig(128, 64, 8, 3),
          LaunchConfig(64, 64, 4, 2)],
    256: [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 64, 4, 2)],
}
_SM90_FP8_FWD_MASKED = {
    64: [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 64, 4, 2)],
    128: [LaunchConfig(128, 64, 8, 3), LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2)],
    256: [LaunchConfig(128, 64, 8, 3), LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 64, 4, 2)],
}

# Any other GPU (Ampere, Ada, Blackwell, AMD): conservative choices that fit
# in about 100 KB of shared memory.
_GENERIC = {
    "fwd": {
        64: [LaunchConfig(128, 64, 4, 2), LaunchConfig(64, 64, 4, 2)],
        128: [LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 32, 4, 2)],
        256: [LaunchConfig(64, 32, 4, 2), LaunchConfig(32, 32, 4, 1)],
    },
    "dkdv": {
        64: [LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 32, 4, 1)],
        128: [LaunchConfig(64, 64, 8, 2), LaunchConfig(32, 32, 4, 1)],
        256: [LaunchConfig(32, 32, 4, 1), LaunchConfig(16, 16, 4, 1)],
    },
    "dq": {
        64: [LaunchConfig(64, 64, 4, 2), LaunchConfig(32, 32, 4, 1)],
        128: [LaunchConfig(64, 64, 8, 2), LaunchConfig(32, 32, 4, 1)],
        256: [LaunchConfig(32, 32, 4, 1), LaunchConfig(16, 16, 4, 1)],
    },
}

# Triton's interpreter runs one program after another on the CPU: small tiles
# keep padding waste low, and one config only.
_INTERPRETER = LaunchConfig(32, 32, 4, 1)


def _bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _halve_for_fp32(cfg: LaunchConfig) -> LaunchConfig:
    # 4-byte operands need twice the shared memory per tile
    return LaunchConfig(max(16, cfg.block_m // 2), max(16, cfg.block_n // 2), cfg.num_warps, max(1, cfg.num_stages - 1))


def _entry(table: dict, kernel: str, bucket: int) -> list[LaunchConfig] | None:
    """The entry of ``kernel`` or, failing that, of its name without its last suffixes."""
    while bucket not in table.get(kernel, {}):
        if "_" not in kernel:
            return None
        kernel = kernel.rsplit("_", 1)[0]
    return table[kernel][bucket]


def split_dkdv(block_d: int, elem_size: int, capability: tuple[int, int] | None) -> bool:
    """Whether the launch table runs dK and dV in two launches (2-byte inputs, Hopper)."""
    return capability is not None and capability[0] == 9 and elem_size == 2 and _bucket(block_d) in _SM90["dk"]


def launch_configs(kernel: str, block_d: int, elem_size: int, capability: tuple[int, int] | None) -> list[LaunchConfig]:
    """Configs to try, best first, for ``kernel``: "fwd", "dkdv", "dk", "dv" or "dq", with the
    suffix "_tma" when it reads through tensor descriptors, then "_causal" for
    a causal mask without a left window or "_window" with a left window bound
    (forward), then (forward) "_short" for rows of fewer keys than
    ``launch.SHORT_KEYS``. A variant without an entry for this head dim takes
    the entry of the name without its last suffix; "dk" and "dv" (the dK/dV
    kernel computing one of the two) without an entry take that of "dkdv".

    ``capability`` is the CUDA compute capability, or None under the interpreter.
    """
    if capability is None:
        return [_INTERPRETER]
    base = kernel.split("_")[0]
    table = _SM90 if capability[0] == 9 else _GENERIC
    bucket = _bucket(block_d)
    if capability[0] == 9 and elem_size == 1 and base == "fwd":
        masked = "_causal" in kernel or "_window" in kernel
        return (_SM90_FP8_FWD_MASKED if masked else _SM90_FP8_FWD)[bucket] + [LaunchConfig(16, 16, 4, 1)]
    entry = _entry(table, kernel, bucket)
    if entry is None:  # "dk" / "dv"
        base = "dkdv"
        entry = _entry(table, base + kernel.removeprefix(kernel.split("_")[0]), bucket)
    configs = list(entry)
    if elem_size == 4:
        configs = [_halve_for_fp32(c) for c in configs]
        if capability[0] == 9:
            configs = _SM90_FP32.get(base, _SM90_FP32["dkdv"]).get(bucket, []) + configs
    # last resort: the smallest tiles a dot accepts
    configs.append(LaunchConfig(16, 16, 4, 1))
    return configs


# The forward kernel's block-sparse loops read each tile's list entry a stage
# ahead of its K/V loads (kernels/tiles.py, sparse_tile): on Hopper two stages
# more than the config's, which still fits the 128 x 128 tiles.
def sparse_constexprs(kernel: str, cfg: LaunchConfig, capability: tuple[int, int] | None) -> dict:
    """Extra compile-time switches of a block-sparse launch of ``kernel`` with ``cfg``."""
    if not kernel.startswith("fwd"):
        return {}
    return dict(SPARSE_STAGES=cfg.num_stages + (2 if capability and capability[0] == 9 else 0))


def decode_config(rows: int, block_d: int, elem_size: int, capability: tuple[int, int] | None,
                  page_size: int = 0, kv_elem_size: int | None = None) -> LaunchConfig:
    """Tiles of the split-KV decoding kernel for ``rows = seqlen_q * group_size``
    query rows per (batch, kv head) and a cache with pages of ``page_size``
    rows (0: contiguous). It streams the cache, so BLOCK_M is as small as the
    rows allow (a dot needs 16) and BLOCK_N keeps a few K/V tiles in flight.
    ``elem_size``: bytes of q's (the compute) dtype; ``kv_elem_size``: bytes of
    a cache element (1 for an fp8 cache; default ``elem_size``)."""
    block_m = min(128, max(16, 1 << (max(rows, 1) - 1).bit_length()))
    if capability is None:
        return LaunchConfig(block_m, 32, 4, 1)
    num_warps = 8 if block_m >= 128 else 4
    wide = block_d <= 128 and elem_size <= 2
    if capability[0] == 9 and block_m <= 64 and kv_elem_size == 1 and elem_size <= 2:
        # fp8 cache (not measured yet: benchmarks/decode.py --kv-fp8 --sweep): a tile in
        # shared memory is half the bytes of a 16-bit one, converted to 16 bits in registers.
        # Head dim 256 takes 64-key tiles (the registers of a 16-bit 128 x 128 tile, the
        # shared memory of a 16-bit 32 x 256 one); 5 stages for contiguous caches as for
        # paged ones keep about as many bytes in flight as the 16-bit tiles' 3 stages
        return LaunchConfig(block_m, 128 if wide else 64, num_warps, 5)
    if capability[0] == 9 and block_m <= 64:
        # 128-key tiles, 3 stages for a contiguous cache; a paged one (a page lookup before
        # each tile's loads, which takes half of the stages) wants more loads in flight: 5
        # stages (docs/experiments/2026-12-02-decoding-8k.md). Launches without splits
        # change this for paged caches (launch/decode.py)
        return LaunchConfig(block_m, 128 if wide else 32, num_warps, 5 if page_size else 3)
    return LaunchConfig(block_m, 64 if wide else 32, num_warps, 2)
