"""ClipBERT (Lei et al. 2021, "Less is More: ClipBERT for Video-and-Language Learning via Sparse
Sampling"; reference implementation jayleicn/ClipBERT) as a polyclip domain module.

A ResNet-50 grid-feature CNN and a BERT-base cross-encoder score (text, clip) pairs; a video is a few
sparsely sampled clips whose scores are aggregated. Reads the reference's checkpoints
(``clipbert_image_text_pretrained.pt`` and fine-tuned ``model_step_*.pt``), runs text-video retrieval
and video QA. Video decoding needs PyAV (the ``video`` extra); everything else is torch and tokenizers.

    model, report = load_clipbert("clipbert_image_text_pretrained.pt")
    tokenizer = BertWordPieceTokenizer("bert-base-uncased/vocab.txt", max_length=20)
    clips = load_video_clips("video.mp4", SparseSamplingConfig(num_clips=16, num_frames=2))
    scores = score_videos(model, [clips.pixels], tokenizer(["a man is cooking"]))
"""

from polyclip.domains.clipbert.aggregate import (
    AGGREGATIONS,
    aggregate_clip_logits,
    clip_consensus_loss,
    match_scores,
)
from polyclip.domains.clipbert.checkpoint import (
    LoadReport,
    load_clipbert,
    load_reference_weights,
    save_clipbert,
    to_reference_state_dict,
)
from polyclip.domains.clipbert.config import (
    ClipBertConfig,
    ClipBertConfigError,
    CrossEncoderConfig,
    GridBackboneConfig,
    HeadConfig,
    clipbert_config,
    tiny_clipbert_config,
)
from polyclip.domains.clipbert.model import ClipBert, ClipBertInputError, ClipBertOutput
from polyclip.domains.clipbert.qa import (
    QAConfig,
    QAError,
    answer_multiple_choice,
    answer_open_ended,
    load_answer_vocabulary,
    qa_accuracy,
)
from polyclip.domains.clipbert.retrieval import (
    VideoRetrievalConfig,
    VideoRetrievalMetrics,
    rank_score_matrix,
    retrieval_metrics,
    score_videos,
)
from polyclip.domains.clipbert.sources import (
    init_cnn_from_detectron2,
    init_cnn_from_torchvision,
    init_text_from_bert,
)
from polyclip.domains.clipbert.tokenizer import BertWordPieceTokenizer, TextBatch
from polyclip.domains.clipbert.video import (
    SparseSamplingConfig,
    VideoClips,
    VideoDecodeError,
    VideoPreprocessConfig,
    clip_frame_indices,
    load_video_clips,
    preprocess_frames,
    probe_video,
    read_video_frames,
)

__all__ = [
    "AGGREGATIONS",
    "BertWordPieceTokenizer",
    "ClipBert",
    "ClipBertConfig",
    "ClipBertConfigError",
    "ClipBertInputError",
    "ClipBertOutput",
    "CrossEncoderConfig",
    "GridBackboneConfig",
    "HeadConfig",
    "LoadReport",
    "QAConfig",
    "QAError",
    "SparseSamplingConfig",
    "TextBatch",
    "VideoClips",
    "VideoDecodeError",
    "VideoPreprocessConfig",
    "VideoRetrievalConfig",
    "VideoRetrievalMetrics",
    "aggregate_clip_logits",
    "answer_multiple_choice",
    "answer_open_ended",
    "clip_consensus_loss",
    "clip_frame_indices",
    "clipbert_config",
    "init_cnn_from_detectron2",
    "init_cnn_from_torchvision",
    "init_text_from_bert",
    "load_video_clips",
    "load_answer_vocabulary",
    "load_clipbert",
    "load_reference_weights",
    "match_scores",
    "preprocess_frames",
    "probe_video",
    "qa_accuracy",
    "rank_score_matrix",
    "read_video_frames",
    "retrieval_metrics",
    "save_clipbert",
    "score_videos",
    "tiny_clipbert_config",
    "to_reference_state_dict",
]
