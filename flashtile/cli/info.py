"""``flashtile info``: this machine, and which backend each kind of call takes here."""

from __future__ import annotations

import os
import platform


def _line(name: str, text: str) -> None:
    print(f"{name + ':':<24}{text}")


def _gluon_line() -> str:
    """Which forward calls take the Gluon (warp-specialised) kernels on this sm90 GPU."""
    from flashtile.backends.triton.launch import gluon

    choice = os.environ.get("FLASHTILE_GLUON")
    if not gluon._gluon_importable():
        return "the Triton forward (this Triton has no Gluon)"
    if choice == "0":
        return "the Triton forward (FLASHTILE_GLUON=0)"
    if choice == "1":
        return "the Gluon kernels for every dense bf16/fp16 call at head dim 64 or 128 (FLASHTILE_GLUON=1)"
    keys = ", ".join(f"head dim {d} from {n} keys" for d, n in gluon.GLUON_MIN_KEYS.items())
    causal = ", ".join(f"head dim {d} from {n} keys" for d, n in gluon.GLUON_CAUSAL_MIN_KEYS.items())
    return (f"the Gluon kernels for full attention at {keys}, causal at {causal} (where they measured "
            f"faster; FLASHTILE_GLUON=1/0 for always/never)")


def _gluon_backward_line() -> str:
    """Which backward calls take the Gluon dK/dV kernel on this sm90 GPU."""
    if os.environ.get("FLASHTILE_GLUON_BWD") == "1":
        return ("dK/dV by the Gluon kernel for full and causal attention (GQA included) at head dim 64 "
                "or 128 (FLASHTILE_GLUON_BWD=1); the Triton kernels for the rest")
    return "the Triton kernels (FLASHTILE_GLUON_BWD=1 for the Gluon dK/dV kernel, measured slower so far)"


def print_info() -> None:
    import torch

    import flashtile
    from flashtile.backends.triton.launch import autotune

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    _line("flashtile", f"{flashtile.__version__} ({os.path.dirname(flashtile.__file__)})")
    _line("python / torch / triton", f"{platform.python_version()} / {torch.__version__} / {triton_version}")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    gpu = torch.cuda.is_available()
    if gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        major, minor = props.major, props.minor
        _line("device", f"{props.name}, compute capability {major}.{minor}, {props.multi_processor_count} "
                        f"multiprocessors, {props.total_memory / 2**30:.0f} GiB")
        if major < 8:
            _line("GPU tensors", "not served: the kernels need compute capability 8.0 or later")
        else:
            hopper = major == 9
            _line("GPU tensors", "the Triton kernels" + (": tensor descriptors (TMA) for rows of 1k-2k keys and "
                                                         "more, the Hopper launch table" if hopper else
                                                         ": pointer loads, the conservative launch table "
                                                         "(tuned on Hopper only)"))
            if (major, minor) == (9, 0):
                _line("Hopper forward", _gluon_line())
                _line("Hopper backward", _gluon_backward_line())
    else:
        _line("device", f"CPU only ({torch.get_num_threads()} threads); no CUDA GPU"
              + (" (this torch is a CPU build)" if torch.version.cuda is None else ""))
        _line("GPU tensors", "none here")
    if interpreting:
        _line("CPU tensors", "the Triton kernels under Triton's interpreter (TRITON_INTERPRET=1: for tests, slow)")
    else:
        _line("CPU tensors", "dense attention (causal or not, windows, boolean masks, GQA, varlen sequences): "
                             "PyTorch's fused CPU flash attention; softcap, ALiBi, float bias, dropout, sinks, "
                             "block-sparse, cosine-sim and decoding: the tiled PyTorch path")
    tuning = autotune.enabled()
    _line("launch configurations", "the table checked into flashtile/backends/triton/launch/table.py"
          + (f"; autotuning on, cache {autotune.cache_path()}" if tuning else
             "; autotuning off (FLASHTILE_AUTOTUNE=1 or flashtile.set_autotune(True))"))
    attention = torch.nn.attention
    if hasattr(attention, "list_flash_attention_impls"):
        active = attention.current_flash_attention_impl()
        _line("SDPA flash backend", "flashtile registered" + (f"; active: {active}" if active else
                                                              "; activate with torch.nn.attention."
                                                              "activate_flash_attention_impl('flashtile')"))
    else:
        _line("SDPA flash backend", "this PyTorch has no flash attention registry; flashtile.integrations.sdpa_flash."
                                    "enabled() installs the kernels directly")
    try:
        import transformers
        _line("transformers", f"{transformers.__version__}: import flashtile.integrations.transformers, then "
                              "attn_implementation='flashtile'")
    except ImportError:
        _line("transformers", "not installed (pip install -e '.[transformers]')")
