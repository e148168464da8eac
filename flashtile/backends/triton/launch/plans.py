"""Launch plans: a call's host work (layout, switches, launch-table lookup, Triton's
binding and specialisation of some 60 arguments) depends only on the shapes,
strides, dtypes and 16-byte alignment of its tensors, its options and the
environment. The first call of each such signature records its launches as a
plan; later calls rebuild only the argument lists around their own tensors and
call the compiled kernels' launchers directly."""

from __future__ import annotations

import torch
import triton

from ....options import AttnOptions
from . import autotune
from . import choose
from .choose import KernelLaunch
from .device import scratch_allocator
from .invariant import batch_invariant


# The FLASHTILE_* switches of the environment (experiments: FLASHTILE_FWD_TMA, _FWD_WS,
# _BWD_TMA, _BWD_SPLIT, _FP32_DOT, _AUTOTUNE) are read when a plan is made: after changing one in a
# running process, clear_caches().
_plans: dict[tuple, "LaunchPlan"] = {}
# plan key -> what a launcher derived from the call's layout before its launches (decoding:
# tiles and split count), kept beside the plan so that a replayed call skips that too
plan_setups: dict[tuple, tuple] = {}
# tests set this: every plan hit also builds its launches the slow way and compares them
check_plans = False
# other launchers' caches of choices made from a layout (register_cache), cleared with the plans
_other_caches: list[dict] = []


def register_cache(cache: dict) -> dict:
    """Have ``clear_caches`` clear ``cache`` too; returns it."""
    _other_caches.append(cache)
    return cache


def clear_caches() -> None:
    """Forget the chosen launch configs, the launch plans and the launchers' other
    choices: after changing a FLASHTILE_* switch or a launch-table entry in a
    running process."""
    choose._chosen.clear()
    choose._last.clear()
    _plans.clear()
    plan_setups.clear()
    for cache in _other_caches:
        cache.clear()


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
    return (kind, autotune._enabled, batch_invariant(), device, tf32, first.device, *map(_tensor_key, tensors),
            *extra)


def plan_key(kind: str, tensors: tuple, opts: AttnOptions, extra: tuple) -> tuple | None:
    """``layout_key`` of an attention call with options ``opts``, or None for
    calls that are not planned (block-sparse, launch configs forced by tools, seeds
    beyond 32 bits)."""
    if choose.forced_configs or opts.block_mask is not None or not -2**31 <= opts.seed < 2**31:
        return None
    # Triton specialises integer arguments equal to 1 or divisible by 16: the seed's class
    seed = (opts.seed == 1, opts.seed % 16 == 0)
    return layout_key(kind, tensors, (opts[:5], _tensor_key(opts.alibi), _tensor_key(opts.bias), opts.dropout_p,
                                      seed, opts[9:13], _tensor_key(opts.sinks), *extra))


class LaunchPlan:
    """The launches of one call signature (see ``layout_key``): ``steps`` as run by
    the first call, ``builders`` giving each step's arguments from a call's values
    (``builder(cfg, call)``)."""

    def __init__(self, steps: list[KernelLaunch], builders: list):
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
                    triton.set_allocator(scratch_allocator)
                stream = driver.active.get_current_stream(driver.active.get_current_device())
            compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)

    def check(self, rebuilt: list[KernelLaunch], call: tuple) -> None:
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


def run_planned(key: tuple | None, call: tuple, make_steps) -> None:
    """Replay the plan of ``key`` for ``call``, or run the launches that
    ``make_steps(build_only=False)`` builds and keep them as the plan of ``key`` (None: no plan).
    With ``check_plans``, a replay is compared with ``make_steps(build_only=True)``."""
    plan = _plans.get(key) if key is not None else None
    if plan is not None:
        plan.run(call)
        if check_plans:
            plan.check(make_steps(build_only=True)[0], call)
        return
    steps, builders = make_steps(build_only=False)
    if key is not None:
        _plans[key] = LaunchPlan(steps, builders)

