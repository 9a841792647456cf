"""Generic tests over every tiny registered architecture and small configs of every kind of tower:
shapes, finite outputs, a gradient for every parameter, gradient checkpointing, the causal text tower's
padding-trimming fast path, fp32 vs bf16, config round trips; and OpenAI's parameter counts.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from polyclip.models import (
    ConfigError,
    DualEncoder,
    DualEncoderConfig,
    TextConfig,
    VisionConfig,
    create_model,
    get_architecture,
    list_architectures,
)


def _vit(act: str = "quick_gelu") -> VisionConfig:
    return VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act=act)


def _map_vit(act: str) -> VisionConfig:
    return VisionConfig(
        image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64, act=act, norm_eps=1e-6, pool="map",
        class_token=False, pre_norm=False, patch_bias=True, projection=False,
    )  # fmt: skip


def _text(act: str = "quick_gelu", **changes) -> TextConfig:
    fields = dict(
        vocab_size=64, context_length=12, width=32, layers=2, heads=2, mlp_dim=64, act=act, eos_token_id=63
    )
    return TextConfig(**{**fields, **changes})


def _bidirectional(act: str) -> TextConfig:
    return _text(act, norm_eps=1e-6, causal=False, pool="last", eos_token_id=1, projection_bias=True)


CUSTOM = {
    "vit-quick-gelu": DualEncoderConfig(embed_dim=16, vision=_vit(), text=_text()),
    "vit-gelu": DualEncoderConfig(embed_dim=16, vision=_vit("gelu"), text=_text("gelu")),
    "siglip-gelu": DualEncoderConfig(
        embed_dim=32, vision=_map_vit("gelu"), text=_bidirectional("gelu"), init_logit_bias=-10.0
    ),
    "siglip-gelu-tanh": DualEncoderConfig(
        embed_dim=32, vision=_map_vit("gelu_tanh"), text=_bidirectional("gelu_tanh"), init_logit_bias=-10.0
    ),
    "resnet": DualEncoderConfig(
        embed_dim=16,
        vision=VisionConfig(kind="resnet", image_size=32, resnet_layers=(1, 2, 1, 1), resnet_width=8),
        text=_text(),
    ),
    "text-causal-eos": DualEncoderConfig(embed_dim=16, vision=_vit(), text=_text(pool="eos", eos_token_id=5)),
    "text-bidirectional-last": DualEncoderConfig(
        embed_dim=16, vision=_vit("gelu"), text=_text("gelu", causal=False, pool="last")
    ),
}
TINY = [name for name in list_architectures() if name.startswith("tiny-")]
CASES = TINY + sorted(CUSTOM)


def build(case: str, seed: int = 0) -> DualEncoder:
    """The model with every weight random (BatchNorm's zero-initialised scales too), in eval mode."""
    torch.manual_seed(seed)
    model = create_model(CUSTOM.get(case) or case)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point() and name not in ("logit_scale", "logit_bias"):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def inputs(model: DualEncoder, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images and three texts of different lengths, padded with zeros after an end token (the highest
    id for CLIP-style vocabularies, the configured eos otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config.text
    images = torch.randn(2, 3, model.image_size, model.image_size, generator=generator)
    context = config.context_length
    end = config.eos_token_id if config.pool == "eos" else config.vocab_size - 1
    ids = torch.zeros(3, context, dtype=torch.long)
    for row, length in enumerate((2, context // 2, context - 2)):
        ids[row, :length] = torch.randint(6, config.vocab_size - 1, (length,), generator=generator)
        ids[row, length] = end
    if config.pool == "last":
        ids[ids == 0] = end  # bidirectional towers pad with their end token and read the last position
    return images, ids


def contrastive_loss(model: DualEncoder, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Images i and texts i are pairs: softmax cross-entropy (CLIP) or the sigmoid loss (SigLIP)."""
    out = model(images, ids[: images.shape[0]])
    logits = out.logits_per_image  # (B, B)
    labels = torch.arange(logits.shape[0])
    if model.config.uses_sigmoid:
        signs = 2 * torch.eye(logits.shape[0]) - 1
        return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("case", CASES)
def test_shapes_and_finite_outputs(case):
    model = build(case)
    images, ids = inputs(model)
    embed_dim = model.config.embed_dim
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(ids)
        out = model(images, ids)
    assert image_features.shape == (2, embed_dim) and text_features.shape == (3, embed_dim)
    assert out.logits_per_image.shape == (2, 3) and out.logits_per_text.shape == (3, 2)
    for tensor in (image_features, text_features, out.logits_per_image, out.image_embeds, out.text_embeds):
        assert torch.isfinite(tensor).all()
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    assert model.encode_text(ids[:0]).shape == (0, embed_dim)


def _gradients(model: DualEncoder, images: torch.Tensor, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = contrastive_loss(model, images, ids)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_gets_a_gradient_and_checkpointing_matches(case):
    model = build(case)
    images, ids = inputs(model)
    loss, grads = _gradients(model, images, ids)
    no_gradient = sorted(name for name, grad in grads.items() if grad is None or not grad.abs().sum() > 0)
    assert not no_gradient, f"parameters without a gradient: {no_gradient}"
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    model.set_grad_checkpointing(True)
    checkpointed_loss, checkpointed_grads = _gradients(model, images, ids)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_text_trimming_equals_full_padding(case):
    model = build(case)
    _, ids = inputs(model)
    text = model.text
    with torch.no_grad():
        fast = model.encode_text(ids)
        # reference: every position through the tower, then the pooled token
        states = text.forward_features(ids)  # (B, L, D)
        pooled = states[torch.arange(ids.shape[0]), text.pool_positions(ids)]
        full = text.proj(pooled) if text.proj is not None else pooled
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    if text.config.causal:
        # what follows the end token cannot change a causal tower's embedding
        noisy = ids.clone()
        for row, position in enumerate(text.pool_positions(ids).tolist()):
            noisy[row, position + 1 :] = 7
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(noisy), fast, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bf16_agrees_with_fp32(case):
    model = build(case)
    images, ids = inputs(model)
    with torch.no_grad():
        reference = model(images, ids)
        half = model.to(torch.bfloat16)(images, ids)
    for name in ("image_embeds", "text_embeds"):
        expected, got = getattr(reference, name), getattr(half, name).float()
        assert got.dtype == torch.float32 and getattr(half, name).dtype == torch.bfloat16
        cosine = F.cosine_similarity(got, expected, dim=-1)
        assert (cosine > 0.995).all(), f"{name}: cosine {cosine.tolist()}"
        torch.testing.assert_close(got, expected, atol=3e-2, rtol=0)


@pytest.mark.parametrize("name", list_architectures())
def test_every_architecture_builds_and_its_config_round_trips(name):
    config = get_architecture(name)
    with torch.device("meta"):  # full-size models without allocating their weights
        model = DualEncoder(config)
    assert model.image_size == config.vision.image_size
    data = json.loads(json.dumps(config.to_dict()))
    assert DualEncoderConfig.from_dict(data) == config
    assert DualEncoderConfig.from_dict(data).to_dict() == config.to_dict()


@pytest.mark.parametrize("case", sorted(CUSTOM))
def test_custom_config_round_trip(case):
    config = CUSTOM[case]
    assert DualEncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unknown_config_keys_are_rejected():
    data = get_architecture("tiny-vit").to_dict()
    with pytest.raises(ConfigError, match="unknown keys \\['patch_drop'\\]"):
        DualEncoderConfig.from_dict({**data, "patch_drop": 0.5})
    with pytest.raises(ConfigError, match="vision config: unknown keys \\['depth'\\]"):
        DualEncoderConfig.from_dict({**data, "vision": {**data["vision"], "depth": 3}})
    with pytest.raises(ConfigError, match="text config: unknown keys \\['rope'\\]"):
        DualEncoderConfig.from_dict({**data, "text": {**data["text"], "rope": True}})
    with pytest.raises(ConfigError, match="unknown architecture 'ViT-Q-99'"):
        create_model("ViT-Q-99")
    with pytest.raises(ConfigError, match="smaller than patch_size"):
        VisionConfig(image_size=6, patch_size=8)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        VisionConfig(kind="naflex", image_size=30, patch_size=8, pool="map", class_token=False, pre_norm=False)
    assert VisionConfig(image_size=30, patch_size=8).grid_size == 3  # the convolution drops 6 px


@pytest.mark.parametrize(("name", "expected"), [("ViT-B-32", 151_277_313), ("RN50", 102_007_137)])
def test_openai_parameter_counts(name, expected):
    with torch.device("meta"):
        model = DualEncoder(get_architecture(name))
    assert sum(p.numel() for p in model.parameters()) == expected
