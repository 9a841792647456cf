"""Fine-tuning recipes of the systems polyclip serves, one small function each.

Every recipe starts from a released checkpoint (``model.pretrained``, a registry name; a local copy of
the weights works offline) and leaves ``data.train`` empty: the user points it at their own pairs.
Facts come from each system's paper, model card or training code, named in the docstring; where a
reference gives no value the docstring says which default polyclip chose instead.
"""

from __future__ import annotations

from polyclip.train.config import (
    AugmentConfig,
    DataConfig,
    LossConfig,
    ModelSpec,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)


def finetune() -> TrainConfig:
    """Fine-tune a local checkpoint (polyclip demo's model, any model folder): --from DIR.

    The model comes from ``--from DIR`` (or ``--set model.pretrained=DIR``) with its own preprocessing
    and tokenizer; the loss is the model's (``loss.kind=auto``: sigmoid with a logit bias, as SigLIP
    and the demo model, softmax otherwise). No crops or flips, since captions may name positions
    and orientation (the demo's do); AdamW at 1e-4 with a short warm-up, one epoch (polyclip's
    choice for small local fine-tunes: set ``schedule.max_steps`` or ``schedule.epochs`` to change).
    """
    return TrainConfig(
        name="finetune",
        data=DataConfig(batch_size=64),
        augment=AugmentConfig(random_resized_crop=None),
        loss=LossConfig(kind="auto"),
        optim=OptimConfig(lr=1e-4, weight_decay=0.05),
        schedule=ScheduleConfig(epochs=1, warmup_steps=10),
    )


def clip() -> TrainConfig:
    """Generic fine-tune of OpenAI CLIP ViT-B/32 on your image-caption pairs (softmax loss).

    open_clip's fine-tuning practice: AdamW (0.9, 0.98), eps 1e-6, weight decay 0.1, a small rate
    with warm-up and cosine decay, light random resized crops.
    """
    return TrainConfig(
        name="clip",
        model=ModelSpec(pretrained="clip-vit-b-32"),
        data=DataConfig(batch_size=128),
        loss=LossConfig(kind="clip"),
        optim=OptimConfig(lr=1e-5, weight_decay=0.1),
        schedule=ScheduleConfig(epochs=10, warmup_steps=100),
    )


def siglip() -> TrainConfig:
    """Fine-tune SigLIP ViT-B/16-224 with its own sigmoid loss ("Sigmoid Loss for Language Image Pre-Training", 2023).

    Square resize without crops, as SigLIP's preprocessing; the sigmoid loss is chunked so that large
    batches fit. Rate and decay are polyclip's fine-tuning defaults (the paper's are for pre-training).
    """
    return TrainConfig(
        name="siglip",
        model=ModelSpec(pretrained="siglip-base-patch16-224"),
        data=DataConfig(batch_size=256),
        augment=AugmentConfig(random_resized_crop=None),
        loss=LossConfig(kind="siglip", chunk_size=4096),
        optim=OptimConfig(lr=1e-5, weight_decay=1e-4),
        schedule=ScheduleConfig(epochs=10, warmup_steps=100),
    )


def pubmedclip() -> TrainConfig:
    """PubMedCLIP (2023): CLIP ViT-B/32 fine-tuned on ROCO radiology pairs.

    ROCO's csv (``id, name, caption``; images under ``data.image_root``). From the PubMedCLIP
    repository (``configs/medclip_roco_all.yaml``, ``main/train.py``, ``lib/data_transform``): batch 64,
    50 epochs, Adam with lr 1e-5, weight decay 5e-4 (an L2 penalty), eps 1e-6, a constant rate, no
    clipping; training images get RandomResizedCrop(0.08-1) and horizontal flips with ImageNet
    statistics. PubMedCLIP weighted the two cross-entropy directions 0.7/0.3; this uses CLIP's
    symmetric loss.
    """
    return TrainConfig(
        name="pubmedclip",
        model=ModelSpec(pretrained="clip-vit-b-32", preprocess="pubmedclip"),
        data=DataConfig(format="csv", image_key="name", caption_key="caption", batch_size=64),
        augment=AugmentConfig(random_resized_crop=(0.08, 1.0), hflip=0.5),
        loss=LossConfig(kind="clip"),
        optim=OptimConfig(
            name="adam", lr=1e-5, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-6, grad_clip_norm=None
        ),
        schedule=ScheduleConfig(epochs=50, warmup_steps=0, decay="constant"),
    )


def plip() -> TrainConfig:
    """PLIP (2023): CLIP ViT-B/32 fine-tuned on pathology image-text pairs (OpenPath).

    Captions up to CLIP's 77 tokens. Optimiser settings are not in polyclip's references; this uses
    polyclip's CLIP fine-tuning defaults (AdamW 1e-5, weight decay 0.1, cosine).
    """
    config = clip()
    config.name = "plip"
    config.data.batch_size = 128
    config.augment = AugmentConfig(random_resized_crop=(0.8, 1.0), hflip=0.5, vflip=0.5)  # slides have no up
    return config


def fashionclip() -> TrainConfig:
    """FashionCLIP (2022): continue training FashionCLIP 2.0 on your own catalogue.

    A catalogue of ``{id, image, caption}`` rows (product photo and its description). FashionCLIP 2.0
    is the LAION ViT-B/32 (exact GELU) tuned on Farfetch products; its optimiser settings are not in
    polyclip's references, so this uses polyclip's CLIP fine-tuning defaults with a smaller rate.
    """
    return TrainConfig(
        name="fashionclip",
        model=ModelSpec(pretrained="fashionclip"),
        data=DataConfig(image_key="image", caption_key="caption", batch_size=128),
        augment=AugmentConfig(random_resized_crop=(0.9, 1.0), hflip=0.5),
        loss=LossConfig(kind="clip"),
        optim=OptimConfig(lr=5e-6, weight_decay=0.1),
        schedule=ScheduleConfig(epochs=5, warmup_steps=100),
    )


def clip_rsicd() -> TrainConfig:
    """CLIP-RSICD (2021): CLIP ViT-B/32 fine-tuned on RSICD remote-sensing captions.

    ``dataset_rsicd.json`` (``images[].filename``, ``split``, ``sentences[].raw``), the ``train`` split,
    every one of the five captions a sample. From the CLIP-RSICD repository's ``run_clip_flax_tv.py`` and ``run_clip_training_tv.sh``:
    captions at 32 tokens, batch 2048 (256 per device x 8), 10 epochs, 50 warm-up steps then linear
    decay, Adam at 2e-6 with betas (0.9, 0.95), weight decay 0.1, five captions per image
    (``--captions_per_image 5``). Its caption augmentation (``--augment_captions``) is a data file, not a
    transform: the repository's ``textaug_train_rsicd.jsonl`` (``{"filename", "captions"}`` records with
    augmented captions) replaces ``dataset_rsicd.json``; train on it with ``data.train=textaug_train_rsicd.jsonl
    data.format=jsonl data.split=null``. Image augmentations random crop to 80%, horizontal and vertical flips and a
    random resized crop of scale 0.8-1.2 at aspect 1. The reference also calls torchvision's
    ``ColorJitter()`` with its default arguments, which changes nothing, so no jitter is applied here
    (``augment.color_jitter=0.2,0.2,0.2`` adds one). The released v2 used Adafactor at a peak rate of
    1e-4; this recipe follows the current script's Adam run.
    """
    return TrainConfig(
        name="clip_rsicd",
        model=ModelSpec(pretrained="clip-vit-b-32", context_length=32),
        data=DataConfig(format="json", split="train", captions="each", batch_size=2048),
        augment=AugmentConfig(
            random_crop=0.8, random_resized_crop=(0.8, 1.2), aspect_ratio=(1.0, 1.0), hflip=0.5, vflip=0.5
        ),
        loss=LossConfig(kind="clip"),
        optim=OptimConfig(lr=2e-6, weight_decay=0.1, betas=(0.9, 0.95)),
        schedule=ScheduleConfig(epochs=10, warmup_steps=50, decay="linear"),
        precision="bf16",
    )


BIOCLIP_TEXT_TYPES = ("taxonomic", "scientific", "common", "scientific_common", "taxonomic_common")


def bioclip() -> TrainConfig:
    """BioCLIP (2024): CLIP ViT-B/16 trained with mixed text types on TreeOfLife-10M.

    Every image carries one caption per text type, in columns named as ``BIOCLIP_TEXT_TYPES``:
    taxonomic ("a photo of Animalia Chordata ... species."), scientific, common, scientific + common
    ("a photo of {sci} with common name {com}.") and taxonomic + common; each batch uses one type.
    Global batch 32,768, cosine decay and mixed precision (model card); the batch is accumulated
    exactly from micro-batches of 256 (GradCache) so it fits any number of GPUs. Rate 1e-4, weight
    decay 0.2 and 1,000 warm-up steps are open_clip's pre-training defaults, which BioCLIP's code uses.
    """
    return TrainConfig(
        name="bioclip",
        model=ModelSpec(pretrained="clip-vit-b-16", preprocess="bioclip"),
        data=DataConfig(text_types=BIOCLIP_TEXT_TYPES, batch_size=32768),
        micro_batch_size=256,
        loss=LossConfig(kind="clip", local_loss=True, gather_with_grad=True),
        optim=OptimConfig(lr=1e-4, weight_decay=0.2),
        schedule=ScheduleConfig(epochs=100, warmup_steps=1000),
        precision="bf16",
    )


def streetclip() -> TrainConfig:
    """StreetCLIP (2023): CLIP ViT-L/14-336 trained on geotagged street-level images.

    Captions are written from each image's place labels with StreetCLIP's template ("A Street View photo
    close to the town of {city} in the region of {region} in {country}."): a CSV with ``image, city,
    region, country`` columns. Starts, as StreetCLIP did, from OpenAI's ViT-L/14-336 (set
    ``model.pretrained=streetclip`` to continue from StreetCLIP itself). The model card gives no
    optimiser settings; this recipe fine-tunes gently (AdamW 1e-6, 3 epochs) to keep the general
    zero-shot ability StreetCLIP builds on.
    """
    return TrainConfig(
        name="streetclip",
        model=ModelSpec(pretrained="clip-vit-l-14-336", grad_checkpointing=True),
        data=DataConfig(
            caption_template="A Street View photo close to the town of {city} in the region of {region} in {country}.",
            batch_size=128,
        ),
        augment=AugmentConfig(random_resized_crop=(0.9, 1.0)),
        loss=LossConfig(kind="clip"),
        optim=OptimConfig(lr=1e-6, weight_decay=0.1),
        schedule=ScheduleConfig(epochs=3, warmup_steps=100),
        precision="bf16",
    )
