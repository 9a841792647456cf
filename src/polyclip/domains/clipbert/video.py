"""Sparse sampling of video clips, decoding with PyAV, and ClipBERT's frame preprocessing.

Sparse sampling (Lei et al. 2021, section 3; reference: jayleicn/ClipBERT ``src/datasets/decoder.py``
``get_start_end_idx`` / ``temporal_sampling`` and ``dataset_video_retrieval.py``): a clip spans
``num_frames / target_fps`` seconds, i.e. ``clip_size = num_frames * video_fps / target_fps`` source
frames. With ``delta = max(total - clip_size, 0)`` the clip starts at

- ``delta * i / num_clips`` for clip i of ``num_clips`` evenly spaced clips (inference), or
- a uniform random point of ``[0, delta]``, independently per clip (training),

and its frames are ``linspace(start, start + clip_size - 1, num_frames)``, clamped to the video and
truncated to integers. A video shorter than one clip repeats frames, as the reference does.

Frames are decoded in order and only the sampled ones are converted to pixels. Preprocessing
(``src/datasets/data_utils.py`` ``ImageResize``, ``ImagePad``, ``ImageNorm``): RGB 0..255 floats,
bilinear resize (``align_corners=False``, no antialiasing) so that the longer side is ``max_size``
(448 for video), zero padding on the right and bottom to ``max_size`` x ``max_size`` *before*
normalisation, minus the ImageNet mean x 255 with std 1, then channels reversed to BGR, the input
convention of detectron2's ResNet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from polyclip.images import ImageDecodeError, is_image_file, load_image

SAMPLING_MODES = ("uniform", "random")


class VideoDecodeError(ValueError):
    """A video (or frame folder) cannot be opened, holds no video stream, or fails to decode."""


@dataclass
class SparseSamplingConfig:
    num_clips: int = 16  # inference clips (the paper's MSRVTT test setting); training uses 8
    num_frames: int = 2  # frames per clip, mean-pooled by the model
    target_fps: float = 2.0  # clip frame rate: 2 for MSRVTT and DiDeMo, 1 for ActivityNet

    def __post_init__(self) -> None:
        if self.num_clips < 1 or self.num_frames < 1:
            raise ValueError(
                f"num_clips and num_frames must be positive, got {self.num_clips}, {self.num_frames}"
            )
        if not self.target_fps > 0:
            raise ValueError(f"target_fps must be positive, got {self.target_fps}")


@dataclass
class VideoPreprocessConfig:
    max_size: int = 448  # longer side after resizing; the shorter side is padded to the same size
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB order, 0..255 (ImageNet mean x 255)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


def clip_frame_indices(
    num_video_frames: int,
    video_fps: float,
    config: SparseSamplingConfig,
    mode: str = "uniform",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """(num_clips, num_frames) int64 source-frame indices of the sampled clips."""
    if num_video_frames < 1:
        raise VideoDecodeError("the video has no frames to sample")
    if not video_fps > 0:
        raise VideoDecodeError(f"the video's frame rate must be positive, got {video_fps}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {mode!r}")
    clip_size = config.num_frames * video_fps / config.target_fps  # in source frames
    delta = max(num_video_frames - clip_size, 0.0)
    if mode == "uniform":
        starts = delta * np.arange(config.num_clips) / config.num_clips
    else:
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        starts = (
            generator.uniform(0.0, delta, size=config.num_clips) if delta > 0 else np.zeros(config.num_clips)
        )
    indices = np.empty((config.num_clips, config.num_frames), dtype=np.int64)
    for clip, start in enumerate(starts):
        # torch.linspace in float32 as the reference, so that truncation lands on the same frames
        positions = torch.linspace(float(start), float(start + clip_size - 1), config.num_frames)
        indices[clip] = positions.clamp(0, num_video_frames - 1).long().numpy()
    return indices


@dataclass
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


def _open(path: Path):
    import av  # optional dependency: the ``video`` extra

    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise VideoDecodeError(f"cannot open video {path}: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path} holds no video stream")
    return container


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(Fraction(rate))
    return 0.0


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count (header, else counted from packets), frame rate and size, without decoding pixels."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        width, height = stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as error:
        raise VideoDecodeError(f"cannot read video {path}: {error}") from error
    finally:
        container.close()
    if num_frames <= 0 or fps <= 0:
        raise VideoDecodeError(f"{path}: cannot tell the frame count ({num_frames}) or frame rate ({fps})")
    return VideoInfo(num_frames=num_frames, fps=fps, width=width, height=height)


def read_video_frames(path: str | Path, indices: np.ndarray) -> np.ndarray:
    """Decode the frames at ``indices`` (any shape) -> uint8 RGB array of shape ``indices.shape + (H, W, 3)``.

    Indices past the last decodable frame take the last frame (headers sometimes over-count).
    """
    import av

    path = Path(path)
    flat = np.asarray(indices, dtype=np.int64).reshape(-1)
    wanted = set(flat.tolist())
    last_wanted = max(wanted)
    container = _open(path)
    decoded: dict[int, np.ndarray] = {}
    last_frame, count = None, 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for count, frame in enumerate(container.decode(stream), start=1):
            index = count - 1
            last_frame = frame
            if index in wanted:
                decoded[index] = frame.to_ndarray(format="rgb24")
            if index >= last_wanted:
                break
    except av.FFmpegError as error:
        raise VideoDecodeError(f"cannot decode video {path} (frame {count}): {error}") from error
    finally:
        container.close()
    if last_frame is None:
        raise VideoDecodeError(f"{path}: no frame could be decoded")
    if count - 1 < last_wanted:
        fallback = last_frame.to_ndarray(format="rgb24")
        for index in wanted:
            decoded.setdefault(index, fallback)
    frames = np.stack([decoded[i] for i in flat.tolist()])  # (N, H, W, 3)
    return frames.reshape(*np.shape(indices), *frames.shape[1:])


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_frame_files(folder: str | Path) -> list[Path]:
    """Image files of a frame folder in natural order (frame2 before frame10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"no frame folder at {folder}")
    files = sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=_natural_key)
    if not files:
        raise VideoDecodeError(f"{folder} holds no image frames")
    return files


def preprocess_frames(
    frames: np.ndarray | torch.Tensor, config: VideoPreprocessConfig | None = None
) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB -> (N, 3, S, S) float32 BGR, resized, padded and mean-subtracted."""
    config = config or VideoPreprocessConfig()
    pixels = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.array(frames, copy=True))
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise VideoDecodeError(f"frames must be (N, H, W, 3) RGB, got shape {tuple(pixels.shape)}")
    pixels = pixels.permute(0, 3, 1, 2).float()  # (N, 3, H, W), 0..255
    height, width = pixels.shape[-2:]
    if height >= width:
        size = (config.max_size, int(config.max_size * (width / height)))
    else:
        size = (int(config.max_size * (height / width)), config.max_size)
    size = (max(size[0], 1), max(size[1], 1))
    pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
    pixels = F.pad(
        pixels, (0, config.max_size - size[1], 0, config.max_size - size[0])
    )  # zeros, then normalise
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    pixels = (pixels - mean) / std
    return pixels.flip(1).contiguous()  # RGB -> BGR


@dataclass
class VideoClips:
    """Sampled, preprocessed clips of one video."""

    pixels: torch.Tensor  # (num_clips, num_frames, 3, S, S)
    frame_indices: np.ndarray  # (num_clips, num_frames) source-frame indices
    source: str
    info: VideoInfo | None = field(default=None, repr=False)


def load_video_clips(
    source: str | Path,
    sampling: SparseSamplingConfig | None = None,
    preprocess: VideoPreprocessConfig | None = None,
    mode: str = "uniform",
    rng: np.random.Generator | int | None = None,
    frames_fps: float | None = None,
) -> VideoClips:
    """Sample clips from a video file or a folder of frame images and preprocess them.

    A frame folder has no frame rate: ``frames_fps`` says how many of its images make one second
    (default: the sampling's ``target_fps``, i.e. the frames were extracted at the clip rate).
    """
    sampling = sampling or SparseSamplingConfig()
    source = Path(source)
    if source.is_dir():
        files = list_frame_files(source)
        fps = frames_fps or sampling.target_fps
        indices = clip_frame_indices(len(files), fps, sampling, mode, rng)
        processed: dict[int, torch.Tensor] = {}
        for index in sorted(set(indices.reshape(-1).tolist())):
            try:
                image = load_image(files[index])
            except ImageDecodeError as error:
                raise VideoDecodeError(f"frame {files[index]} cannot be read: {error}") from error
            # frames may differ in size: each is resized and padded on its own
            processed[index] = preprocess_frames(np.asarray(image)[None], preprocess)[0]
        pixels = torch.stack([processed[i] for i in indices.reshape(-1).tolist()])
        info = None
    else:
        info = probe_video(source)
        indices = clip_frame_indices(info.num_frames, info.fps, sampling, mode, rng)
        frames = read_video_frames(source, indices)
        frames = frames.reshape(-1, *frames.shape[-3:])  # (C*T, H, W, 3)
        pixels = preprocess_frames(frames, preprocess)
    pixels = pixels.view(sampling.num_clips, sampling.num_frames, *pixels.shape[1:])
    return VideoClips(pixels=pixels, frame_indices=indices, source=str(source), info=info)
