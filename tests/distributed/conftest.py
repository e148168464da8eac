import pytest
from cluster import Cluster


@pytest.fixture(scope="session")
def gloo():
    """Four CPU processes joined by gloo, started at first use and kept for the
    session; ``gloo.run(size, fn, **kwargs)`` runs a case on a group of ``size`` of them."""
    cluster = Cluster(4, "gloo")
    yield cluster
    cluster.close()
