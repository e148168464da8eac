"""FP8 (float8_e4m3fn) helpers shared by the kernels that read or write FP8.

``to_e4m3`` casts fp32 to float8_e4m3fn with rounding to nearest (ties to
even) and saturation at +-448, on a GPU and under Triton's interpreter alike:
the interpreter's own fp32 -> fp8 cast truncates and drops the carry when
rounding reaches the next power of two (1.98 becomes 1.0), so with EXACT the
value is first rounded onto the e4m3 grid in fp32 integer arithmetic and the
cast only re-encodes it. Kernels set EXACT under the interpreter; on a GPU the
hardware cast already rounds to nearest even.
"""

import triton
import triton.language as tl

E4M3_MAX = tl.constexpr(448.0)
# below this, e4m3 values are subnormal: multiples of 2**-9
_E4M3_MIN_NORMAL = tl.constexpr(0.015625)
# adding and subtracting 1.5 * 2**14 (an fp32 spacing of 2**-9 there) rounds to a multiple of 2**-9
_SUBNORMAL_SHIFT = tl.constexpr(24576.0)


@triton.jit
def round_e4m3(x):
    """fp32 ``x`` rounded to the nearest float8_e4m3fn value (ties to even), saturated
    to +-448, as fp32 (NaN stays NaN)."""
    bits = x.to(tl.int32, bitcast=True)
    # normal numbers: keep 3 of fp32's 23 mantissa bits, ties to even (a carry moves the exponent)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    ax = tl.abs(x)
    subnormal = (ax + _SUBNORMAL_SHIFT) - _SUBNORMAL_SHIFT
    subnormal = tl.where(x < 0, -subnormal, subnormal)  # keeps the sign of values rounded to 0
    r = tl.where(ax < _E4M3_MIN_NORMAL, subnormal, normal)
    r = tl.minimum(tl.maximum(r, -E4M3_MAX), E4M3_MAX)
    return tl.where(x != x, x, r)  # noqa: PLR0124 (NaN test)


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """``x`` (fp32) as float8_e4m3fn, rounded to nearest even and saturated at +-448
    (see the module docstring for EXACT)."""
    if EXACT:
        return round_e4m3(x).to(tl.float8e4nv)
    return tl.minimum(tl.maximum(x, -E4M3_MAX), E4M3_MAX).to(tl.float8e4nv)
