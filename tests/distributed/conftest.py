import pytest
import torch
from cluster import Cluster

_clusters: dict[str, Cluster] = {}


@pytest.fixture(scope="session", autouse=True)
def _close_clusters():
    yield
    for cluster in _clusters.values():
        cluster.close()


def _cluster(backend: str) -> Cluster:
    if backend not in _clusters:
        size = 4 if backend == "gloo" else min(4, torch.cuda.device_count())
        _clusters[backend] = Cluster(size, backend)
    return _clusters[backend]


@pytest.fixture
def gloo() -> Cluster:
    """Four CPU processes joined by gloo, started at first use and kept for the
    session; ``gloo.run(size, fn, **kwargs)`` runs a case on a group of ``size`` of them."""
    return _cluster("gloo")


@pytest.fixture(params=["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def ranks(request) -> Cluster:
    """The gloo processes, or one process per GPU (up to four) joined by NCCL
    (``FLASHTILE_TEST_GPU=1`` on a machine with two GPUs or more)."""
    if request.param == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs two GPUs or more")
    return _cluster(request.param)
