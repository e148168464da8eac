"""A rank that fails leaves the ring's other ranks raising within the process
group's timeout, not waiting forever: fresh gloo processes whose ring group has
a short timeout (the session's cluster keeps a long one), watched from here
with a limit of their own."""

import datetime
import queue
import time

import torch
import torch.multiprocessing as mp
from cluster import _free_port

_GROUP_TIMEOUT_S = 2


def _rank(rank: int, world_size: int, port: int, results, done) -> None:
    import torch.distributed as dist

    from flashtile.distributed import ring_flash_attn_func

    torch.set_num_threads(1)
    # joining waits for the slowest process to start: a long timeout there, the short one in the ring's group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    dist.barrier()
    group = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=_GROUP_TIMEOUT_S))
    q = torch.randn(1, 8, 2, 16)
    start = time.monotonic()
    try:
        bad = q[:, :7] if rank == 0 else q  # rank 0 passes an odd shard: it raises before sending anything
        ring_flash_attn_func(bad, bad, bad, group, causal=True).sum().backward()
        results.put((rank, None, "", time.monotonic() - start))
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put((rank, type(err).__name__, str(err), time.monotonic() - start))
    done.wait(60)  # stays up (as a rank of a training job would) until the test has every answer


def test_a_failed_rank_makes_every_rank_raise():
    ctx = mp.get_context("spawn")
    results, done, world_size, port = ctx.Queue(), ctx.Event(), 2, _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, world_size, port, results, done), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    answers = {}
    try:
        for _ in range(world_size):
            rank, error, message, elapsed = results.get(timeout=90)  # process start included
            answers[rank] = (error, message, elapsed)
    except queue.Empty:
        pass
    finally:
        done.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join()
    assert sorted(answers) == list(range(world_size)), f"ranks {set(range(world_size)) - set(answers)} hung"
    assert answers[0][0] == "FlashtileValueError" and "seqlen_local must be even" in answers[0][1]
    for rank in range(1, world_size):
        error, message, elapsed = answers[rank]
        assert error == "RuntimeError" and "got no answer from its neighbours" in message, (rank, error, message)
        assert elapsed < 5 * _GROUP_TIMEOUT_S, f"rank {rank} raised after {elapsed:.1f} s"
