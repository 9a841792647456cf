"""WiSE-FT mixing (every float entry, BatchNorm statistics included, as the reference) and the BatchNorm
re-estimation offered beside it."""

from __future__ import annotations

import pytest
import torch

import polyclip
from polyclip.train.demo import demo_model_config
from polyclip.train.wise_ft import WiseFtError, recompute_batchnorm, wise_ft


def _pair():
    torch.manual_seed(0)
    zero_shot = polyclip.create_model(demo_model_config()).eval()
    torch.manual_seed(1)
    fine_tuned = polyclip.create_model(demo_model_config()).eval()
    with torch.no_grad():
        for model, value in ((zero_shot, 0.2), (fine_tuned, 1.4)):
            model.visual.stem[1].running_var.fill_(value)
    return zero_shot, fine_tuned


def test_every_float_entry_is_interpolated_as_the_reference_does():
    zero_shot, fine_tuned = _pair()
    mixed = wise_ft(zero_shot, fine_tuned, 0.25)
    for name, value in mixed.state_dict().items():
        if value.is_floating_point():
            expected = 0.75 * zero_shot.state_dict()[name] + 0.25 * fine_tuned.state_dict()[name]
            torch.testing.assert_close(value, expected, msg=name)
    assert float(mixed.visual.stem[1].running_var[0]) == pytest.approx(0.5)
    with pytest.raises(WiseFtError, match="alpha"):
        wise_ft(zero_shot, fine_tuned, 1.5)


def test_batchnorm_statistics_are_re_estimated_on_the_given_images():
    zero_shot, fine_tuned = _pair()
    mixed = wise_ft(zero_shot, fine_tuned, 0.5)
    weights = {
        k: v.clone() for k, v in mixed.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    pixels = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 + 1
    recompute_batchnorm(mixed, [pixels[:8], pixels[8:]])
    assert not mixed.training
    first_conv, first_norm = mixed.visual.stem[0], mixed.visual.stem[1]
    with torch.no_grad():
        activations = first_conv(pixels)  # (16, C, H, W)
    torch.testing.assert_close(first_norm.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    for name, value in mixed.state_dict().items():
        if name in weights:
            assert torch.equal(value, weights[name]), name  # only the statistics change
