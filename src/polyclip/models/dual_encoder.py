"""The dual encoder: an image tower, a text tower and a learned temperature (plus a bias for
sigmoid-loss models). CLIP and SigLIP are configurations of this one class.

logits = exp(logit_scale) * cos(image, text) (+ logit_bias)      (Radford et al. 2021; Zhai et al. 2023)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.models.config import DualEncoderConfig
from polyclip.models.naflex import NaFlexVisionTransformer
from polyclip.models.resnet import ModifiedResNet
from polyclip.models.text import TextTransformer
from polyclip.models.vit import VisionTransformer

VISION_TOWERS = {"vit": VisionTransformer, "resnet": ModifiedResNet, "naflex": NaFlexVisionTransformer}


@dataclass
class DualEncoderOutput:
    logits_per_image: torch.Tensor  # (B_img, B_txt)
    logits_per_text: torch.Tensor  # (B_txt, B_img)
    image_embeds: torch.Tensor  # (B_img, E), L2-normalised
    text_embeds: torch.Tensor  # (B_txt, E), L2-normalised


class DualEncoder(nn.Module):
    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        self.visual = VISION_TOWERS[config.vision.kind](config.vision, config.embed_dim)
        self.text = TextTransformer(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.init_logit_bias))) if config.uses_sigmoid else None
        )

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E); a NaFlex tower takes its packed patches (B, N + 1, P*P*3) instead
        (what its preprocessing returns: see `polyclip.models.naflex`)."""
        features = self.visual(pixels.to(device=self.device, dtype=self._compute_dtype()))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids -> (B, E)."""
        token_ids = token_ids.to(self.device)
        if token_ids.shape[0] == 0:
            return torch.zeros(0, self.config.embed_dim, dtype=self._compute_dtype(), device=self.device)
        features = self.text(token_ids)
        return F.normalize(features, dim=-1) if normalize else features

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logits per image (B_img, B_txt) from L2-normalised embeddings."""
        scale = self.logit_scale.clamp(max=self.config.logit_scale_max).exp()
        logits = scale * image_embeds @ text_embeds.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def forward(self, pixels: torch.Tensor, token_ids: torch.Tensor) -> DualEncoderOutput:
        image_embeds = self.encode_image(pixels, normalize=True)
        text_embeds = self.encode_text(token_ids, normalize=True)
        logits_per_image = self.logits(image_embeds, text_embeds)
        return DualEncoderOutput(logits_per_image, logits_per_image.T, image_embeds, text_embeds)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def _compute_dtype(self) -> torch.dtype:
        # A quantised model keeps fp32 activations; otherwise inputs follow the weights.
        return self.logit_scale.dtype
