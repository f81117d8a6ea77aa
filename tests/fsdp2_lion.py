"""Lion on FSDP2 (fully_shard) DTensor parameters, CPU + gloo, against an unsharded replica.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_lion.py

Every rank feeds the same batch, so the sharded gradient equals the replica's; after a few
steps the gathered parameters must match the replica's (tolerance 1e-6 absolute). Prints one
line per impl; rank 0 prints FAILED on a mismatch.
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lion_hf import Lion

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for impl in ("for_loop", "foreach", "compiled"):
    torch.manual_seed(0)
    replica = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    sharded = copy.deepcopy(replica)
    fully_shard(sharded, mesh=mesh)
    kwargs = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    opt_replica = Lion(replica.parameters(), impl="for_loop", **kwargs)
    opt_sharded = Lion(sharded.parameters(), impl=impl, **kwargs)
    for step in range(4):
        x, y = torch.randn(8, 16), torch.randn(8, 5)
        for model, opt in ((replica, opt_replica), (sharded, opt_sharded)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    is_sharded = all(hasattr(p, "full_tensor") for p in sharded.parameters())
    max_diff = max(
        float((p.detach().full_tensor() - q.detach()).abs().max()) for p, q in zip(sharded.parameters(), replica.parameters())
    )
    if dist.get_rank() == 0:
        print(f"{impl}: sharded={is_sharded} max_diff={max_diff:.2e}" + (" FAILED" if max_diff > 1e-6 else ""))
dist.barrier()
dist.destroy_process_group()
