"""Opt-in autotuning of launch configurations, cached on disk.

By default every kernel launch takes the first configuration of its launch
table that compiles (``.table``): no time goes into searching,
and a first call costs one compile. The table was measured on Hopper; other
GPUs get conservative defaults. With autotuning on (``FLASHTILE_AUTOTUNE=1``
or ``set_autotune``), the first launch of a kernel variant for a given
GPU, head dim, dtype, set of switches and sequence-length bucket times a
grid of configurations on that call's own arguments (the kernels only store
their outputs, so running them again is harmless), keeps the fastest, and
writes it to a JSON file that later processes read:
``FLASHTILE_AUTOTUNE_CACHE``, default ``~/.cache/flashtile/autotune.json``.
Expect that first launch to take about a minute per kernel variant (each
of the ~25 candidates is compiled); later calls, in this process or
another, cost nothing extra. The decoding kernels are not tuned. Launches inside CUDA-graph capture never tune (they use the
cached choice if there is one, else the table).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterable

import triton

from .table import LaunchConfig

log = logging.getLogger("flashtile")

# the grid searched after the table's own entries (those first, so a tie keeps the table's choice)
_TILES = ((128, 128), (128, 64), (64, 128), (64, 64), (32, 128), (128, 32))
_WARPS = (4, 8)
_STAGES = (2, 3)

# the table's choice stays unless another config is faster by more than this fraction
KEEP_DEFAULT_WITHIN = 0.03

_enabled: bool | None = None  # None: follow FLASHTILE_AUTOTUNE
_cache_file: Path | None = None  # None: follow FLASHTILE_AUTOTUNE_CACHE
_entries: dict[Path, dict[str, list[int]]] = {}
_lock = threading.Lock()


def set_autotune(enabled: bool = True, cache_file: str | os.PathLike | None = None) -> None:
    """Turn autotuning of launch configurations on or off for this process.

    Args:
        enabled: True to tune each new kernel variant on its first launch
            (see the module docstring), False for the launch table only.
        cache_file: JSON file of tuned choices; default the environment's
            ``FLASHTILE_AUTOTUNE_CACHE`` or ``~/.cache/flashtile/autotune.json``.
    """
    global _enabled, _cache_file
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune: enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled
    _cache_file = None if cache_file is None else Path(cache_file)


def enabled() -> bool:
    """Whether launches autotune (set_autotune, else FLASHTILE_AUTOTUNE=1)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("FLASHTILE_AUTOTUNE", "0") == "1"


def cache_path() -> Path:
    if _cache_file is not None:
        return _cache_file
    env = os.environ.get("FLASHTILE_AUTOTUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flashtile" / "autotune.json"


def search_space(table: Iterable[LaunchConfig]) -> list[LaunchConfig]:
    """Candidates, in order: the launch table's entries, then the grid."""
    grid = [LaunchConfig(m, n, w, s) for m, n in _TILES for w in _WARPS for s in _STAGES]
    return list(dict.fromkeys([*table, *grid]))


def _load(path: Path) -> dict[str, list[int]]:
    entries = _entries.get(path)
    if entries is None:
        entries = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                entries = {k: v for k, v in loaded.items() if isinstance(v, list) and len(v) in (4, 5)}
            except (OSError, ValueError) as exc:
                warnings.warn(f"flashtile: ignoring unreadable autotune cache {path}: {exc}", stacklevel=3)
        _entries[path] = entries
    return entries


def _save(path: Path, key: str, cfg: LaunchConfig) -> None:
    """Add one entry to the file, keeping what other processes wrote meanwhile."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = {}
        if path.exists():
            try:
                on_disk = json.loads(path.read_text())
            except ValueError:
                on_disk = {}
        on_disk.update(_entries.get(path, {}))
        on_disk[key] = list(cfg)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(on_disk, tmp, indent=1, sort_keys=True)
        os.replace(tmp.name, path)
    except OSError as exc:
        warnings.warn(f"flashtile: could not write the autotune cache {path}: {exc}", stacklevel=3)


def lookup(key: str) -> LaunchConfig | None:
    """The cached choice for ``key``, if any (memory, then the cache file)."""
    with _lock:
        entry = _load(cache_path()).get(key)
    return None if entry is None else LaunchConfig(*entry)


def _median_ms(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def tune(key: str, candidates: list[LaunchConfig], run: Callable[[LaunchConfig], None],
         timer: Callable[[Callable[[], None]], float] = _median_ms) -> LaunchConfig:
    """Time ``run(cfg)`` for each candidate (``timer`` gives milliseconds), skip
    those that do not fit (``triton.runtime.errors.OutOfResources``), cache
    the fastest under ``key`` and return it; the first candidate that fits
    (the table's choice) is kept unless beaten by more than
    KEEP_DEFAULT_WITHIN. Raises RuntimeError when none fits."""
    log.info("flashtile: autotuning %s over %d launch configurations", key, len(candidates))
    best, best_ms = None, float("inf")
    default, default_ms = None, float("inf")  # the first that fits: what the table would launch
    for cfg in candidates:
        try:
            run(cfg)  # compile and warm up
            ms = timer(lambda c=cfg: run(c))
        except triton.runtime.errors.OutOfResources:
            continue
        if default is None:
            default, default_ms = cfg, ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    if default is not None and default_ms <= best_ms * (1 + KEEP_DEFAULT_WITHIN):
        # timing noise is a few percent: a change must win by more than that
        best, best_ms = default, default_ms
    if best is None:
        raise RuntimeError(f"flashtile: no launch configuration fits for {key}")
    log.info("flashtile: %s -> %s (%.3f ms)", key, tuple(best), best_ms)
    path = cache_path()
    with _lock:
        _load(path)[key] = list(best)
        _save(path, key, best)
    return best


def size_bucket(n: int) -> int:
    """Sequence lengths tuned together: the next power of two, 128 to 65536."""
    return min(65536, max(128, 1 << max(0, n - 1).bit_length()))  # next power of two, clamped
