"""``flashtile bench train``: a GPT-2 style model trained end to end with the
attention of choice, measured (tokens/s, step time, peak memory, MFU, loss).

It runs ``examples/train_gpt.py`` of the source checkout this package is
installed from (``pip install -e``), its arguments forwarded as they are; the
example also runs as a plain script."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_gpt.py"
PROG = "flashtile bench train"


def load_example() -> ModuleType:
    """``examples/train_gpt.py`` as a module (loaded once)."""
    name = "flashtile_examples_train_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def run(argv: list[str]) -> int:
    """Train with ``argv`` (the example's arguments); returns its exit code."""
    if not EXAMPLE.is_file():
        print(f"{PROG}: error: {EXAMPLE} not found: this command runs the example of a source checkout "
              "(pip install -e .)", file=sys.stderr)
        raise SystemExit(2)
    return load_example().main(argv, prog=PROG)
