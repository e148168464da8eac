"""flashtile's exceptions: Python's conventional classes (``TypeError`` for dtypes,
``ValueError`` for shapes and values) that are also ``RuntimeError``, which
flash_attn raises for its checks, so code written against either catches them.
``NotImplementedError`` (a valid option not built yet) is a ``RuntimeError``
already."""


class FlashtileTypeError(TypeError, RuntimeError):
    """A wrong dtype or type of an argument, named in the message."""


class FlashtileValueError(ValueError, RuntimeError):
    """A wrong shape or value of an argument, named in the message."""
