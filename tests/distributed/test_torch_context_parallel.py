"""PyTorch's own context parallelism (torch.distributed.tensor.experimental.
context_parallel, a ring over SDPA's flash operators) with flashtile behind those
operators (flashtile/integrations/sdpa_flash.py).

On the CPU, ``F.scaled_dot_product_attention`` goes to
``_scaled_dot_product_flash_attention_for_cpu``, which PyTorch's context
parallelism does not shard; so the CPU test calls SDPA's flash operator on
the sharded DTensors itself, with flashtile's kernels installed for the CPU
(where PyTorch has no kernel of that operator, so every block it computes is
flashtile's). On GPUs the test goes through ``F.scaled_dot_product_attention``
with ``activate_flash_attention_impl("flashtile")``."""

import pytest
import torch
import torch.distributed as dist
from cluster import device, group

from flashtile.distributed import zigzag_shard
from flashtile.testing import attention_ref

try:
    from torch.distributed.tensor.experimental import context_parallel
except ImportError:  # older PyTorch
    context_parallel = None

pytestmark = pytest.mark.skipif(context_parallel is None, reason="this PyTorch has no context_parallel")


def torch_cp_case(seed, dtype):
    import torch.nn.functional as F
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    from flashtile.integrations import sdpa_flash

    torch.manual_seed(seed)
    world_size, rank = dist.get_world_size(group()), dist.get_rank(group())
    mesh = DeviceMesh.from_group(group() or dist.group.WORLD, device())
    q, k, v = (torch.randn(2, 4, 16 * world_size, 32, dtype=dtype, device=device()) for _ in range(3))
    dout = torch.randn_like(q)
    whole = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*(t.transpose(1, 2) for t in whole), causal=True).transpose(1, 2)
    ref.backward(dout.double())
    # PyTorch's default load balancer for causal attention is the zigzag layout
    expected = [zigzag_shard(t, 2, rank, world_size) for t in [ref.detach()] + [t.grad for t in whole]]
    sharded_dout = zigzag_shard(dout, 2, rank, world_size)
    if device() == "cpu":
        handle = sdpa_flash.install("CPU")
        try:
            with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
                inputs = [DTensor.from_local(t.detach(), mesh, [Shard(2)]).requires_grad_() for t in (q, k, v)]
                out = torch.ops.aten._scaled_dot_product_flash_attention(*inputs, 0.0, True, False)[0]
                out.backward(DTensor.from_local(sharded_dout, mesh, [Shard(2)]))
                results = [out.to_local()] + [t.grad.to_local() for t in inputs]
        finally:
            handle.remove()
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with (sdpa_flash.enabled(), sdpa_kernel(SDPBackend.FLASH_ATTENTION),
              context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2])):
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*inputs, is_causal=True)
            out.backward(sharded_dout)
            results = [out.detach()] + [t.grad for t in inputs]
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for name, got, want in zip(["out", "dq", "dk", "dv"], results, expected):
        torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance, msg=name)


def test_torch_context_parallel_runs_flashtile_on_cpu(gloo):
    gloo.run(2, torch_cp_case, seed=int(torch.randint(0, 2**31 - 1, ())), dtype=torch.float32)


@pytest.mark.gpu
def test_torch_context_parallel_runs_flashtile_on_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs two GPUs or more")
    from conftest import _cluster

    _cluster("nccl").run(2, torch_cp_case, seed=int(torch.randint(0, 2**31 - 1, ())), dtype=torch.bfloat16)
