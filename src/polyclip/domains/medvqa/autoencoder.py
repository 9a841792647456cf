"""MEVF's convolutional denoising autoencoder ("Overcoming Data Limitation in Medical
Visual Question Answering", MICCAI 2019; reference ``auto_encoder.py`` of aioz-ai/MICCAI19-MedVQA, copied
into PubMedCLIP's ``MEVF_PubMedCLIP``).

Encoder on a (B, 1, 128, 128) grey image in 0..1: conv3x3 1->64, ReLU, maxpool 2, conv3x3 64->32,
ReLU, maxpool 2, conv3x3 32->16, ReLU -> (B, 16, 32, 32). Decoder: transposed conv 16->32 (stride 2),
ReLU, conv 32->32, ReLU, transposed conv 32->64 (stride 2), ReLU, conv 64->1, sigmoid -> (B, 1, 128, 128).
The VQA model flattens the code and maps it to 64 dims with a linear layer (``convert`` in the
reference). Module names follow the reference so MEVF's ``pretrained_ae.pth`` loads as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from polyclip.domains.medvqa.errors import MedVQAConfigError

CODE_CHANNELS = 16


class ConvAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        # names as in the reference checkpoint (conv1..conv5, tran_conv1/2)
        self.conv1 = nn.Conv2d(1, 64, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(64, 32, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(32, CODE_CHANNELS, kernel_size=3, padding=1)
        self.tran_conv1 = nn.ConvTranspose2d(CODE_CHANNELS, 32, 3, stride=2, padding=1, output_padding=1)
        self.conv4 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.tran_conv2 = nn.ConvTranspose2d(32, 64, 3, stride=2, padding=1, output_padding=1)
        self.conv5 = nn.Conv2d(64, 1, kernel_size=3, padding=1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, 16, S/4, S/4)."""
        x = F.max_pool2d(F.relu(self.conv1(pixels)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.conv3(x))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """(B, 16, S/4, S/4) -> (B, 1, S, S) in 0..1."""
        x = F.relu(self.tran_conv1(code))
        x = F.relu(self.conv4(x))
        x = F.relu(self.tran_conv2(x))
        return torch.sigmoid(self.conv5(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(pixels))


def add_noise(
    pixels: torch.Tensor, std: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian corruption of the denoising objective (the reference's ``add_noise``, std 0.1)."""
    noise = torch.randn(pixels.shape, generator=generator, device=pixels.device, dtype=pixels.dtype)
    return pixels + std * noise


def load_autoencoder_weights(autoencoder: ConvAutoencoder, path: str | Path) -> None:
    """Load MEVF's ``pretrained_ae.pth`` (a plain state dict with the reference's key names), strictly."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MedVQAConfigError(f"autoencoder weights {path} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors for unreadable files
        raise MedVQAConfigError(f"cannot read {path} as a PyTorch state dict: {error}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise MedVQAConfigError(f"{path} does not hold a state dict")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    expected = autoencoder.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise MedVQAConfigError(
            f"{path} is not an MEVF autoencoder checkpoint: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {sorted(wrong)}"
        )
    autoencoder.load_state_dict(state)


__all__ = ["CODE_CHANNELS", "ConvAutoencoder", "add_noise", "load_autoencoder_weights"]
