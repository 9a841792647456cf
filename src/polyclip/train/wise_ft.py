"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model.

"Robust fine-tuning of zero-shot models" (2022; reference: mlfoundations/wise-ft
``wise_ft.py``): theta = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned. alpha = 0 is the
zero-shot model, 1 the fine-tuned one; intermediate values usually keep most of the fine-tuned
accuracy while recovering the zero-shot model's robustness to distribution shift, the weakness of
plain fine-tuning.

Every floating-point entry of the state dict is interpolated, BatchNorm's running means and variances
included, as the reference does (it mixes ``state_dict()`` entry by entry). Those statistics are not
weights, though: the mixed convolutions produce activations whose statistics are not the mix of the
two models'. `recompute_batchnorm` re-estimates them on images of the fine-tuning distribution
(``torch.optim.swa_utils.update_bn``, the recalibration used for averaged weights);
``benchmarks/limits.py`` measures both on the demo's ResNet tower.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn


class WiseFtError(ValueError):
    """The two models cannot be interpolated (different architectures) or alpha is out of range."""


def wise_ft(zero_shot_model: nn.Module, fine_tuned_model: nn.Module, alpha: float) -> nn.Module:
    """A new model whose floating-point weights interpolate the two; both inputs are left unchanged."""
    if not 0.0 <= alpha <= 1.0:
        raise WiseFtError(f"alpha must lie in [0, 1], got {alpha}")
    zero_shot_config = getattr(zero_shot_model, "config", None)
    fine_tuned_config = getattr(fine_tuned_model, "config", None)
    if (
        zero_shot_config is not None
        and fine_tuned_config is not None
        and zero_shot_config != fine_tuned_config
    ):
        raise WiseFtError("the zero-shot and fine-tuned models have different architectures (configs differ)")
    theta_0 = zero_shot_model.state_dict()
    theta_1 = fine_tuned_model.state_dict()
    if theta_0.keys() != theta_1.keys():
        missing = sorted(theta_0.keys() ^ theta_1.keys())
        raise WiseFtError(f"the models' weights differ in names: {missing[:5]}")
    mixed = {}
    for name, value_1 in theta_1.items():
        value_0 = theta_0[name].to(device=value_1.device)
        if value_0.shape != value_1.shape:
            raise WiseFtError(f"{name}: shapes differ, {tuple(value_0.shape)} vs {tuple(value_1.shape)}")
        if value_1.is_floating_point():
            mixed[name] = torch.lerp(value_0.to(value_1.dtype), value_1, alpha)
        else:  # integer buffers (BatchNorm's batch counter): the fine-tuned value
            mixed[name] = value_1.clone()
    model = copy.deepcopy(fine_tuned_model)
    model.load_state_dict(mixed, strict=True)
    return model


def recompute_batchnorm(model: nn.Module, pixel_batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate the image tower's BatchNorm running statistics on ``pixel_batches`` ((B, 3, H, W)
    preprocessed images), as cumulative averages; the model is returned in eval mode.

    A no-op for towers without BatchNorm (ViTs); the weights are not touched.
    """
    from torch.optim.swa_utils import update_bn

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.visual.modules()):
        device = next(model.parameters()).device
        update_bn((batch.to(device) for batch in pixel_batches), model.visual)
    return model.eval()
