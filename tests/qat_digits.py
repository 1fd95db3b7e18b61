"""A LeNet trained with QAT on the bundled digits: the small real model the export tests
deploy."""

import torch
from torch import nn

from lightning_qat import QuantConvBn2d, prepare_qat
from lightning_qat.app.data import DigitsData
from lightning_qat.app.models import LeNet


def train_qat_digits(config, epochs=4, model=None, lr=0.05):
    """``model`` (default: a small LeNet) prepared with ``config`` and trained on the 8x8
    digits, BN frozen for the last epoch; returns it in eval mode and the data."""
    torch.manual_seed(0)
    data = DigitsData(batch_size=64)
    data.setup()
    model = prepare_qat(model or LeNet(image_size=8, widths=(16, 32, 64)), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        model.train()
        if epoch == epochs - 1:
            for layer in model.modules():
                if isinstance(layer, QuantConvBn2d):
                    layer.freeze_bn()
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval(), data
