"""The router's load monitor kernel (ops.load.observe_load) against its torch form."""
import pytest
import torch

from moe_kernels.ops.load import observe_load


def _torch_form(counts, load, steps, decay, bias, gamma):
    c = counts.float()
    load = torch.where(steps == 0, c, decay * load + (1 - decay) * c)
    if bias is not None:
        bias = bias + gamma * torch.sign(c.mean() - c)
    return load, steps + 1, bias


@pytest.mark.parametrize("E", [1, 7, 64, 256])
@pytest.mark.parametrize("with_bias", [False, True])
def test_observe_load_matches_torch(E, with_bias, device):
    g = torch.Generator().manual_seed(E)
    load = torch.rand(E, generator=g).to(device) * 10
    bias = torch.randn(E, generator=g).to(device) if with_bias else None
    steps = torch.zeros((), dtype=torch.int64, device=device)
    for step in range(3):  # the first step replaces, later steps decay
        counts = torch.randint(0, 50, (E,), generator=g, dtype=torch.int32).to(device)
        want_load, want_steps, want_bias = _torch_form(counts, load.clone(), steps.clone(), 0.9,
                                                       None if bias is None else bias.clone(), 1e-3)
        observe_load(counts, load, steps, 0.9, bias, 1e-3)
        torch.testing.assert_close(load, want_load, rtol=1e-6, atol=1e-6)
        assert int(steps) == int(want_steps) == step + 1
        if bias is not None:
            torch.testing.assert_close(bias, want_bias, rtol=1e-6, atol=1e-6)
