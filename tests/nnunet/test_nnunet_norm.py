"""instance_norm_as_group_norm: the same outputs and state dict, GroupNorm(C, C) modules."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from voxflow.nnunet import instance_norm_as_group_norm


def test_instance_norm_becomes_group_norm_with_the_same_outputs_and_state_dict(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.InstanceNorm3d(4, eps=1e-5, affine=True),
        nn.LeakyReLU(),
        nn.Sequential(nn.Conv3d(4, 3, 3, padding=1), nn.InstanceNorm3d(3, affine=False)),
    ).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    x = torch.from_numpy(rng.normal(size=(2, 1, 6, 8, 10)).astype(np.float32))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        ref = net(x)
        swapped = instance_norm_as_group_norm(net)
        out = swapped(x)
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in swapped.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in swapped.modules()) == 2
    after = swapped.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    swapped.load_state_dict(before, strict=True)  # nnU-Net checkpoints still load
