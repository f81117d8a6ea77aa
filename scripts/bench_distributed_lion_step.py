"""Time DistributedLion.step on 2 simulated ranks (the collective replaced by a copy of this rank's
buffer into both rows), MiniLM-L6-sized fp32 params (22.7M over 105 tensors), CPU. Prints the
median step in ms (after 2 warm-up steps).

    python scripts/bench_distributed_lion_step.py IMPL STEPS THREADS

To compare two checkouts, alternate them in one loop (interleaved, so that the machine's load
hits both alike):

    for i in 1 2 3 4 5 6 7 8; do for tree in OLD NEW; do
        PYTHONPATH=$tree OMP_NUM_THREADS=1 python scripts/bench_distributed_lion_step.py auto 8 1; done; done
"""
import statistics
import sys
import time
import warnings

import torch

from lion_hf import DistributedLion
from lion_hf.optim import distributed

impl, steps = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))
DistributedLion.world_size = lambda self: 2
distributed._all_gather = lambda output, buffer, group: output.view(2, -1).copy_(buffer.expand(2, -1))
H, F, V = 384, 1536, 30522
shapes = [(V, H), (512, H), (2, H), (H,), (H,)]
for _ in range(6):
    shapes += [(H, H), (H,)] * 4 + [(F, H), (F,), (H, F), (H,)] + [(H,), (H,)] * 2
shapes += [(H, H), (H,), (2, H), (2,)]
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
grads = [torch.randn(s, generator=gen) for s in shapes]
assert len(params) == 105 and abs(sum(p.numel() for p in params) - 22.7e6) < 0.1e6
warnings.simplefilter("ignore")
opt = DistributedLion([{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2]}], lr=1e-4, impl=impl)
for p, g in zip(params, grads):
    p.grad = g
times = []
for i in range(steps + 2):
    start = time.perf_counter()
    opt.step()
    if i >= 2:
        times.append(time.perf_counter() - start)
print(f"{statistics.median(times) * 1e3:.1f}")
