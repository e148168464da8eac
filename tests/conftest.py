import os

# The Triton kernels run under Triton's CPU interpreter unless a GPU run asks
# otherwise; this must be set before any @triton.jit function is used.
if os.environ.get("FLASHTILE_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# CI draws the same property-test examples on every run (reproducible failures)
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with the compiled (non-interpreted) Triton kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _check_launch_plans():
    # every call that replays a launch plan also builds its launches the slow way and
    # compares them: a plan key that misses something fails the test that calls it
    from flashtile.backends.triton.launch import plans as launch_plans

    launch_plans.check_plans = True


@pytest.fixture(autouse=True)
def _seed(request):
    # fresh but reproducible inputs per test (crc32, unlike hash(), is the same in every process)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["triton", "triton_halves", "cpu", "tiled"])
def backend(request, monkeypatch):
    """CPU tensors run the Triton kernels under the interpreter (also with the
    two-halves schedule forced on every forward launch), or without it the CPU
    path as a user gets it ("cpu": PyTorch's fused kernel where it serves the
    call, else the tiled path), or the tiled path for every call ("tiled")."""
    monkeypatch.setenv("TRITON_INTERPRET", "0" if request.param in ("cpu", "tiled") else "1")
    if request.param == "tiled":
        from flashtile.backends import torch_fused

        monkeypatch.setattr(torch_fused, "fused_mode", lambda *args, **kwargs: None)
    if request.param == "triton_halves":
        from helpers import force_forward_config

        from flashtile.backends.triton.launch.table import LaunchConfig

        force_forward_config(monkeypatch, LaunchConfig(32, 32, 4, 1, halves=True))
    return request.param
