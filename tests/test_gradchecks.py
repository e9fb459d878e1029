"""The gradcheck our GPU kernel tests use accepts a backward whose float64 sums land in another order each run
(atomics on a GPU) and still rejects a wrong gradient. Simulated on the CPU: no GPU is needed to show it."""

import pytest
import torch

from gradchecks import gradcheck


def _square_sum(error_scale: float, bias: float = 0.0):
    class SquareSum(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x * x).sum(dim=-1)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            exact = 2 * x * grad[..., None] * (1 + bias)
            reordered = exact * (1 + error_scale * torch.randn_like(exact))  # rounding of another summation order
            return reordered

    return SquareSum.apply


def test_reordered_float64_sums_pass():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    op = _square_sum(error_scale=1e-15)
    with pytest.raises(RuntimeError, match="not reentrant"):  # what the GPU tests hit without nondet_tol
        torch.autograd.gradcheck(op, (x,), eps=1e-6, atol=1e-5)
    assert gradcheck(op, (x,), eps=1e-6, atol=1e-5)


def test_wrong_gradient_still_fails():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="Jacobian mismatch"):
        gradcheck(_square_sum(error_scale=1e-15, bias=1e-2), (x,), eps=1e-6, atol=1e-5)
