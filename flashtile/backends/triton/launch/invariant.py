"""Batch-invariant mode: launch choices that do not depend on the batch around a
sequence, so that a sequence's output is bitwise the same alone, in any batch, dense
or packed (varlen), and, when decoding, whatever the cache holds for other sequences.

Within one kernel launch a row's arithmetic depends only on its own query, its keys
and the launch's key tile (BLOCK_N: the order in which the online softmax and the
P V product sum its keys). The launchers otherwise pick tiles from the batch's
longest rows (short rows take "_short" launch-table entries, long ones tensor
descriptors with their own tiles) and split a decoding step's keys into as many
parts as keep the GPU busy, which changes with the batch. In this mode:

* the forward kernel always runs the key tile of the launch table's plain forward
  entry for the head dim, dtype and GPU (other entries' tiles keep their key tile
  replaced by it), and launch autotuning is off for it;
* decoding cuts each sequence's keys into parts of ``SPLIT_KEYS`` keys (the number of
  parts follows from the cache's capacity, never from the batch), and the
  decoding tile does not change with the number of parts.

On the CPU every call takes the tiled path, whose tiles never depend on the batch.
The backward pass is not covered.
"""

from __future__ import annotations

import os

# decoding: the keys of each part of a split sequence in batch-invariant mode
SPLIT_KEYS = 4096

_enabled: bool | None = None  # None: follow FLASHTILE_BATCH_INVARIANT


def set_batch_invariant(enabled: bool = True) -> bool:
    """Turn batch-invariant mode on or off for this process; returns the previous setting.

    In batch-invariant mode the forward pass and decoding give every sequence bitwise
    the same output whatever else is in its batch: alone or batched, dense or packed
    (``flash_attn_varlen_func``), and when decoding whatever the batch size or the
    number of splits (then chosen from the cache's capacity: ``num_splits`` must be
    left at 0). The cost is that of a fixed key tile (see the performance docs).
    The environment variable ``FLASHTILE_BATCH_INVARIANT=1`` turns it on at start.
    On the CPU, every call then takes the tiled path (dense, windowed and masked calls
    otherwise go to PyTorch's fused CPU kernel, which sums in an order of its own).

    Args:
        enabled: True to turn the mode on, False to turn it off.

    Returns:
        bool: whether the mode was on before.
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"set_batch_invariant: enabled must be a bool, got {type(enabled).__name__}")
    previous = batch_invariant()
    _enabled = enabled
    return previous


def batch_invariant() -> bool:
    """Whether batch-invariant mode is on (``set_batch_invariant``, else FLASHTILE_BATCH_INVARIANT=1)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("FLASHTILE_BATCH_INVARIANT", "0") == "1"
