"""Lion on FSDP2 (fully_shard) DTensor parameters, CPU + gloo, against an unsharded replica.

    python -m torch.distributed.run --nproc_per_node 2 tests/launchers/fsdp2_lion.py

Every rank feeds the same batch, so the sharded gradient equals the replica's; after a few
steps the gathered parameters must match the replica's (tolerance 1e-6 absolute). Prints one
line per impl; rank 0 prints FAILED on a mismatch. Then: a NaN in one rank's shard under
nonfinite_grad="skip_step" must make every rank skip, and the optimizer state must survive a
round trip through torch.distributed.checkpoint's state-dict API (state keyed by names).
"""

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lion_hf import Lion

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for impl in ("for_loop", "foreach", "cpp"):  # cpp's kernel takes the local shards
    torch.manual_seed(0)
    replica = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    sharded = copy.deepcopy(replica)
    fully_shard(sharded, mesh=mesh)
    kwargs = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    opt_replica = Lion(replica.parameters(), impl="for_loop", **kwargs)
    opt_sharded = Lion(sharded.parameters(), impl=impl, **kwargs)
    for _ in range(4):
        x, y = torch.randn(8, 16), torch.randn(8, 5)
        for model, opt in ((replica, opt_replica), (sharded, opt_sharded)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    is_sharded = all(hasattr(p, "full_tensor") for p in sharded.parameters())
    max_diff = max(
        float((p.detach().full_tensor() - q.detach()).abs().max())
        for p, q in zip(sharded.parameters(), replica.parameters())
    )
    if dist.get_rank() == 0:
        print(f"{impl}: sharded={is_sharded} max_diff={max_diff:.2e}" + (" FAILED" if max_diff > 1e-6 else ""))

# skip_step: only rank 1's shard of the first weight gets a NaN; both ranks must skip together.
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
fully_shard(model, mesh=mesh)
opt = Lion(model.parameters(), lr=1e-2, impl="foreach", nonfinite_grad="skip_step")
torch.nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 4)).backward()
if dist.get_rank() == 1:
    model[0].weight.grad.to_local()[0, 0] = float("nan")
before = [p.detach().to_local().clone() for p in model.parameters()]
opt.step()
unchanged = all(torch.equal(p.detach().to_local(), b) for p, b in zip(model.parameters(), before))
verdicts = [None] * dist.get_world_size()
dist.all_gather_object(verdicts, (opt.skipped_steps, unchanged))
if dist.get_rank() == 0:
    agreed = all(v == (1, True) for v in verdicts)
    print(f"skip_step: verdicts={verdicts}" + ("" if agreed else " FAILED"))

# Resume through DCP's state-dict API, which keys the optimizer state by parameter names.
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict  # noqa: E402

for p in model.parameters():
    p.grad = torch.ones_like(p)
opt.step()
saved = get_optimizer_state_dict(model, opt)
fresh = Lion(model.parameters(), lr=1e-2, impl="foreach")
set_optimizer_state_dict(model, fresh, saved)
same = all(
    torch.equal(fresh.state[p]["exp_avg"].to_local(), opt.state[p]["exp_avg"].to_local()) for p in model.parameters()
)
key_types = sorted({type(k).__name__ for k in saved["state"]})
if dist.get_rank() == 0:
    print(f"dcp resume: key types={key_types} same={same}" + ("" if same else " FAILED"))
dist.barrier()
dist.destroy_process_group()
