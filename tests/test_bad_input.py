"""Every bad input of DESIGN.md §3 raises a clear error naming the argument."""
import pytest
import torch

from taskrouting import make_masks, ops

MASKS = make_masks(3, 4, 0.5, torch.Generator().manual_seed(0))
X = torch.randn(2, 4, 3, 3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(x=torch.randn(4)), ValueError, "x must have 2 to 5 dims"),
    (dict(x=torch.randn(2, 4, 1, 1, 1, 1)), ValueError, "x must have 2 to 5 dims"),
    (dict(x=torch.randn(2, 5, 3, 3)), ValueError, "masks have 4 channels but x has 5"),
    (dict(x=torch.randint(0, 3, (2, 4, 3, 3))), TypeError, "x must be float32"),
    (dict(task=3), IndexError, "task 3 is out of range for 3 tasks"),
    (dict(task=-1), IndexError, "out of range"),
    (dict(task=1.0), TypeError, "task must be an int"),
    (dict(task=torch.tensor([0.0, 1.0])), TypeError, "integer tensor"),
    (dict(task=torch.tensor([0, 1, 2])), ValueError, r"per-sample task must have shape \[2\]"),
    (dict(task=torch.tensor([0, 5])), IndexError, r"task ids must be in \[0, 3\)"),
    (dict(task=None), ValueError, "task is not set"),
    (dict(masks=MASKS.float()), TypeError, "masks must be a bool tensor"),
    (dict(masks=MASKS[0]), ValueError, "masks must be a bool Tensor"),
    (dict(weight=torch.ones(5)), ValueError, r"weight must have shape \[4\]"),
    (dict(bias=torch.ones(4, dtype=torch.long)), TypeError, "bias must be a floating tensor"),
    (dict(running_mean=torch.zeros(4)), ValueError, "running_mean and running_var must be given together"),
    (dict(training=False), ValueError, "training=False needs running_mean"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(stats="all"), ValueError, "stats must be"),
    (dict(backend="gpu"), ValueError, "backend must be"),
    (dict(backend=3), TypeError, "backend must be a str"),
    (dict(x=torch.randn(1, 4)), ValueError, "more than 1 value per channel"),
])
def test_bad_input(backend, kwargs, error, match):
    args = dict(x=X, masks=MASKS, task=1, backend=backend)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.bn_relu_route(**args)


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="backend='cuda' is not available for cpu tensors"):
        ops.bn_relu_route(X, MASKS, 1, backend="cuda")


def test_direct_kernel_calls_are_checked():
    """The compiled ops check their own arguments: a wrong shape never reads out of bounds."""
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    op = torch.ops.taskrouting.bn_relu_route
    with pytest.raises(ValueError, match=r"route must have shape \[C\] or \[N, C\]"):
        op(X, MASKS[0][:3], None, None, None, None, True, 1e-5, False, False)
    with pytest.raises(TypeError, match="route must be a bool tensor"):
        op(X, MASKS[0].float(), None, None, None, None, True, 1e-5, False, False)
    with pytest.raises(ValueError, match=r"weight must have shape \[4\]"):
        op(X, MASKS[0], torch.ones(2), None, None, None, True, 1e-5, False, False)
    with pytest.raises(ValueError, match="needs running_mean"):
        op(X, MASKS[0], None, None, None, None, False, 1e-5, False, False)
    with pytest.raises(ValueError, match=r"count must have shape \[4\]"):
        torch.ops.taskrouting.bn_relu_route_backward(X, X, MASKS[0], None, None, torch.zeros(4), torch.ones(4),
                                                     torch.ones(2), True, False, [True, False, False])
    with pytest.raises(ValueError, match="grad_y must have the shape of x"):
        torch.ops.taskrouting.backward_reduce(X[:1], X, MASKS[0], torch.zeros(4), torch.ones(4), None, None)
