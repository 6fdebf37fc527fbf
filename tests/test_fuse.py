"""fuse(): BN → ReLU → TaskRouter (and BN → TaskRouter → ReLU) become one fused layer."""
import torch
from torch import nn

from taskrouting import BNReLURoute1d, BNReLURoute2d, TaskRouter, fuse, set_active_task


def vgg_like(authors_order=False):
    torch.manual_seed(0)
    def block(cin, cout, seed):
        tail = [TaskRouter(cout, 5, 0.5, seed=seed), nn.ReLU(inplace=True)] if authors_order \
            else [nn.ReLU(inplace=True), TaskRouter(cout, 5, 0.5, seed=seed)]
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), *tail]
    return nn.Sequential(*block(3, 8, 1), nn.MaxPool2d(2), *block(8, 16, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), TaskRouter(12, 5, seed=3),
                         nn.Linear(12, 1))


def run(model, x, task):
    set_active_task(model, task)
    model.zero_grad()
    y = model(x)
    y.sum().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def check_fuse(authors_order):
    """The fused float32 model against the unfused one run in float64: gradients that are 0 in
    exact arithmetic (a bias before BatchNorm) are float32 noise of ~1e-5 in either model."""
    reference = vgg_like(authors_order).double()
    fused = fuse(vgg_like(authors_order))
    kinds = [type(m) for m in fused]
    assert kinds.count(BNReLURoute2d) == 2 and kinds.count(BNReLURoute1d) == 1
    assert not any(isinstance(m, (TaskRouter, nn.BatchNorm2d, nn.ReLU)) for m in fused)
    g = torch.Generator().manual_seed(1)
    for step, (training, task) in enumerate([(True, 0), (True, torch.tensor([4, 1, 1, 2])), (False, 3), (True, 2)]):
        x = torch.randn(4, 3, 8, 8, generator=g)
        reference.train(training), fused.train(training)
        y_ref, g_ref = run(reference, x.double(), task)
        y_fused, g_fused = run(fused, x, task)
        torch.testing.assert_close(y_fused, y_ref.float(), rtol=1e-5, atol=1e-5)
        for a, b in zip(g_fused, g_ref):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(fused[1].running_var, reference[1].running_var.float())
    assert torch.equal(fused[1].masks, reference[3 if not authors_order else 2].masks)


def test_fuse_bn_relu_router():
    check_fuse(authors_order=False)


def test_fuse_authors_order_bn_router_relu():
    check_fuse(authors_order=True)


def test_fuse_keeps_active_task_and_leaves_other_patterns():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Identity(), TaskRouter(4, 2), nn.BatchNorm2d(4),
                          nn.ReLU6(), TaskRouter(4, 2))
    set_active_task(model, 1)
    fuse(model)
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.ReLU, nn.Identity, TaskRouter, nn.BatchNorm2d,
                                        nn.ReLU6, TaskRouter]
    model = fuse(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), TaskRouter(4, 2)))
    set_active_task(model, 1)
    assert model[0].active_task == 1 and isinstance(model[0], BNReLURoute2d)
