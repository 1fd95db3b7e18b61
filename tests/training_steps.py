"""Small models and a few SGD steps that record everything, for tests that compare two
ways of computing the same training step bit for bit."""

import torch

from lightning_qat.app.models import NIN, LeNet, resnet20

SMALL_NIN = (16, 12, 8, 16, 16, 16, 16, 16)
MODELS = {
    "nin": (lambda: NIN(widths=SMALL_NIN), (8, 3, 32, 32)),
    "resnet20": (resnet20, (4, 3, 32, 32)),
    "lenet": (LeNet, (8, 1, 28, 28)),
}


def train(model, inputs):
    """SGD steps, one per input; every output, gradient and updated Parameter."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for x in inputs:
        optimizer.zero_grad()
        y = model(x)
        y.square().sum().backward()
        optimizer.step()
        # (a learned step without a gradient yet: an empty tensor stands for None)
        grads = [torch.empty(0) if p.grad is None else p.grad.clone() for p in model.parameters()]
        seen += [y.detach(), *grads]
    return seen + [p.detach().clone() for p in model.parameters()] + list(model.buffers())
