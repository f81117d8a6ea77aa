"""DirectCompiled: a compiled function called without dynamo once its graph exists."""

from __future__ import annotations

import torch

from lion_hf.optim.compiled_call import DirectCompiled


def _scale_add(xs: list[torch.Tensor], ys: list[torch.Tensor], alpha: torch.Tensor) -> None:
    for x, y in zip(xs, ys):
        x.mul_(alpha[0]).add_(y)


def test_later_calls_skip_dynamo_and_compute_the_same():
    fn = DirectCompiled(_scale_add, options={})
    xs = [torch.ones(5), torch.ones(9)]
    fn("fp32", xs, [torch.full((5,), 2.0), torch.full((9,), 3.0)], torch.tensor([0.5]))
    assert fn.direct_signatures == 1
    # New lengths and new tensors: the direct call reads them from the arguments.
    xs = [torch.ones(4), torch.ones(11)]
    fn("fp32", xs, [torch.full((4,), 1.0), torch.full((11,), -1.0)], torch.tensor([3.0]))
    torch.testing.assert_close(xs[0], torch.full((4,), 4.0), rtol=0, atol=0)
    torch.testing.assert_close(xs[1], torch.full((11,), 2.0), rtol=0, atol=0)


def test_no_signature_means_always_dynamo():
    fn = DirectCompiled(_scale_add, options={})
    for _ in range(2):
        xs = [torch.ones(3)]
        fn(None, xs, [torch.ones(3)], torch.tensor([2.0]))
        torch.testing.assert_close(xs[0], torch.full((3,), 3.0))
    assert fn.direct_signatures == 0
