"""PubMedCLIP's own files: its MEVF data folder and the models its trainer saves.

The data folder as published for VQA-RAD / SLAKE (``MEVF_PubMedCLIP/main.py --RAD_dir``):

- ``dictionary.pkl``: the pickled ``[word2idx, idx2word]`` of its ``Dictionary``;
- ``cache/trainval_ans2label.pkl`` (or beside the dictionary): ``{answer: label}`` built from the train
  *and* test answers (``create_label.py``): closed answers first, then open ones, an open answer that is
  also a closed one suffixed "#";
- ``glove6b_init_300d.npy``: the (words, 300) GloVe rows of the dictionary;
- ``embed_tfidf_weights.pkl``: ``torch.save`` of the whole ``WordEmbedding`` module (``emb`` and the
  tf-idf smoothed ``emb_``, the ``--op c`` 600-d input);
- ``pretrained_ae.pth``: MEVF's autoencoder state dict.

Pickles are read by unpicklers that execute nothing: the plain pickles may hold no global at all, and
the torch-saved module is rebuilt as attribute records (every class it names becomes an inert record;
only tensors are made), from which the parameters are collected by their module paths.

A model saved by the reference trainer (``utils.save_model``: ``{"epoch", "model_state",
"optimizer_state"}``, ``BAN_Model`` with ``--clip --autoencoder``) maps key by key onto ``MedVQAModel``
(``reference_to_polyclip``); the CLIP model it holds (``clip_v_emb``, OpenAI layout) gives the image tower
and its text tower is the only part left unused. The reference feeds CLIP its own input:
``create_resized_images.py`` resizes to 250x250 (288 for RN50x4) with PIL's default filter, divides by
255, and ``train.py`` / ``test.py`` *reshape* that height-width-channel array to (3, S, S) without
permuting it (``ReferenceClipPixels``).
"""

from __future__ import annotations

import pickle
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polyclip.domains.medvqa.errors import MedVQAConfigError

DICTIONARY_FILE = "dictionary.pkl"
ANSWERS_FILE = "trainval_ans2label.pkl"
GLOVE_FILE = "glove6b_init_300d.npy"
TFIDF_FILE = "embed_tfidf_weights.pkl"
AUTOENCODER_FILE = "pretrained_ae.pth"
REFERENCE_CLIP_SIZES = {"RN50x4": 288}  # every other encoder: 250 (train.py)
REFERENCE_CLIP_SIZE = 250


# ---------------------------------------------------------------------------------------------------------
# pickles that run nothing


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(
            f"the file names {module}.{name}; a data pickle may only hold plain values"
        )


def read_plain_pickle(path: Path):
    """A pickle of plain values (dicts, lists, strings, numbers); any class or function is refused."""
    try:
        with open(path, "rb") as file:
            return _NoGlobals(file, encoding="latin1").load()
    except FileNotFoundError:
        raise MedVQAConfigError(f"{path} does not exist") from None
    except Exception as error:  # malformed pickles fail in many ways; none of them runs code
        raise MedVQAConfigError(f"cannot read {path}: {type(error).__name__}: {error}") from None


class _Record:
    """An object of the file, kept as its attribute dict; nothing of its class runs."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


_STORAGES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}  # fmt: skip


def _rebuild_tensor(storage, offset, size, stride, *_):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _rebuild_parameter(data, *_):
    return data


def _reconstruct(cls, *_):
    return cls() if isinstance(cls, type) and issubclass(cls, _Record) else _Record()


class _ModuleUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file, encoding="latin1")
        self.archive, self.root = archive, root
        self.records: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) in (("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")):
            return _reconstruct
        if module == "torch" and name in _STORAGES:
            return ("storage type", _STORAGES[name])
        # Any other global (the module classes, builtins.set ...) becomes an inert record type.
        return self.records.setdefault(f"{module}.{name}", type(name, (_Record,), {}))

    def persistent_load(self, record):
        if not (isinstance(record, tuple) and len(record) == 5 and record[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent record {record!r}")
        _, kind, key, _location, numel = record
        if not (isinstance(kind, tuple) and kind[0] == "storage type"):
            raise pickle.UnpicklingError(f"unknown storage type {kind!r}")
        raw = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        dtype = kind[1]
        if len(raw) != numel * torch.empty(0, dtype=dtype).element_size():
            raise pickle.UnpicklingError(f"storage {key} has {len(raw)} bytes for {numel} elements")
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _collect(record, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = getattr(record, "state", {})
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if isinstance(tensor, torch.Tensor):
                out[prefix + name] = tensor.clone()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _Record):
            _collect(child, f"{prefix}{name}.", out)


def read_torch_saved_module(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a ``torch.save``-d module object, by module path, running nothing."""
    try:
        with zipfile.ZipFile(path) as archive:
            roots = {n.split("/", 1)[0] for n in archive.namelist() if n.endswith("/data.pkl")}
            if len(roots) != 1:
                raise MedVQAConfigError(f"{path}: expected one data.pkl in the archive, found {len(roots)}")
            root = roots.pop()
            with archive.open(f"{root}/data.pkl") as file:
                top = _ModuleUnpickler(file, archive, root).load()
    except zipfile.BadZipFile:
        raise MedVQAConfigError(
            f"{path} is not a torch zip archive (files saved by torch before 1.6 are not read)"
        ) from None
    except FileNotFoundError:
        raise MedVQAConfigError(f"{path} does not exist") from None
    except MedVQAConfigError:
        raise
    except Exception as error:
        raise MedVQAConfigError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if not isinstance(top, _Record):
        raise MedVQAConfigError(f"{path} does not hold a saved module")
    out: dict[str, torch.Tensor] = {}
    _collect(top, "", out)
    return out


# ---------------------------------------------------------------------------------------------------------
# the data folder


class ReferenceData:
    """The files of a PubMedCLIP / MEVF data folder (``data_RAD``, ``data_SLAKE``)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise MedVQAConfigError(f"reference data folder {self.directory} does not exist")

    def _find(self, name: str) -> Path:
        for candidate in (self.directory / name, self.directory / "cache" / name):
            if candidate.is_file():
                return candidate
        raise MedVQAConfigError(f"{self.directory} has no {name} (nor cache/{name})")

    def words(self) -> list[str]:
        """``idx2word`` of ``dictionary.pkl``, checked against its ``word2idx``."""
        path = self._find(DICTIONARY_FILE)
        data = read_plain_pickle(path)
        if not (isinstance(data, list | tuple) and len(data) == 2 and isinstance(data[0], dict)):
            raise MedVQAConfigError(f"{path} is not a reference dictionary ([word2idx, idx2word])")
        word2idx, idx2word = data
        if [word2idx.get(word) for word in idx2word] != list(range(len(idx2word))):
            raise MedVQAConfigError(f"{path}: word2idx and idx2word disagree")
        return [str(word) for word in idx2word]

    def ans2label(self) -> dict[str, int]:
        path = self._find(ANSWERS_FILE)
        data = read_plain_pickle(path)
        if not isinstance(data, dict) or sorted(data.values()) != list(range(len(data))):
            raise MedVQAConfigError(f"{path} is not an answer -> label map with labels 0..N-1")
        return {str(answer): int(label) for answer, label in data.items()}

    def glove(self) -> np.ndarray:
        path = self._find(GLOVE_FILE)
        try:
            return np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as error:
            raise MedVQAConfigError(f"cannot read {path}: {error}") from None

    def tfidf_embedding(self) -> dict[str, torch.Tensor]:
        """``{"emb.weight", "emb_.weight"}`` of ``embed_tfidf_weights.pkl``."""
        return read_torch_saved_module(self._find(TFIDF_FILE))

    def autoencoder_path(self) -> Path:
        return self._find(AUTOENCODER_FILE)

    def question_files(self) -> list[Path]:
        """``trainset.json`` and ``testset.json`` where present (they type the answers)."""
        return [p for p in (self.directory / "trainset.json", self.directory / "testset.json") if p.is_file()]


def read_reference_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """``model_state`` (and ``epoch``) of a file saved by the reference's ``utils.save_model``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MedVQAConfigError(f"reference checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)  # torch's own restricted unpickler
    except Exception as error:
        raise MedVQAConfigError(f"cannot read {path} as a torch checkpoint: {error}") from None
    state = data.get("model_state", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedVQAConfigError(f"{path} holds no model_state of tensors")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    return state, data.get("epoch") if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------------------
# the reference model's keys


def _weight_norm_linear(prefix: str, source: str) -> dict[str, str]:
    return {f"{prefix}.{p}": f"{source}.{p}" for p in ("weight_g", "weight_v", "bias")}


def reference_key_map(glimpses: int, tfidf: bool, autoencoder: bool) -> dict[str, str]:
    """polyclip key -> reference key for everything but the CLIP tower and the attention's h_mat."""
    keys = {"word_embedding.weight": "w_emb.emb.weight"}
    if tfidf:
        keys["tfidf_embedding.weight"] = "w_emb.emb_.weight"
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        keys[f"question_rnn.{name}"] = f"q_emb.rnn.{name}"
    if autoencoder:
        for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "tran_conv1", "tran_conv2"):
            for p in ("weight", "bias"):
                keys[f"autoencoder.{layer}.{p}"] = f"ae_v_emb.{layer}.{p}"
        keys["autoencoder_projection.weight"], keys["autoencoder_projection.bias"] = (
            "convert.weight",
            "convert.bias",
        )
    keys.update(_weight_norm_linear("ban.attention.visual_net.1", "v_att.logits.v_net.main.1"))
    keys.update(_weight_norm_linear("ban.attention.question_net.1", "v_att.logits.q_net.main.1"))
    for g in range(glimpses):
        keys.update(_weight_norm_linear(f"ban.pooling.{g}.visual_net.1", f"b_net.{g}.v_net.main.1"))
        keys.update(_weight_norm_linear(f"ban.pooling.{g}.question_net.1", f"b_net.{g}.q_net.main.1"))
        keys.update(_weight_norm_linear(f"ban.question_projections.{g}.1", f"q_prj.{g}.main.1"))
    keys.update(_weight_norm_linear("classifier.0", "classifier.main.0"))
    keys.update(_weight_norm_linear("classifier.3", "classifier.main.3"))
    return keys


CLIP_PREFIX = "clip_v_emb."
CLIP_TEXT_KEYS = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                  "logit_scale")  # fmt: skip


def split_clip_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the OpenAI CLIP state under ``clip_v_emb.``, everything else)."""
    clip = {k[len(CLIP_PREFIX) :]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(CLIP_PREFIX)}
    if not clip:
        raise MedVQAConfigError(
            "the checkpoint holds no CLIP model (clip_v_emb.*): was it trained with --clip?"
        )
    return clip, rest


def clip_tower_from_state(clip_state: dict[str, torch.Tensor]):
    """The OpenAI-layout CLIP state -> a polyclip dual encoder (through the checkpoint readers)."""
    from polyclip.checkpoints import build_model, read_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "clip.pt"
        torch.save({k: v.float() for k, v in clip_state.items()}, path)
        checkpoint = read_checkpoint(path, format="openai")
        return build_model(checkpoint)


class ReferenceClipPixels:
    """The reference's CLIP input: PIL resize to S x S (default filter), / 255, HWC buffer read as (3, S, S)."""

    def __init__(self, size: int = REFERENCE_CLIP_SIZE):
        self.size = size
        self.config = self

    def to_dict(self) -> dict:
        return {"kind": "pubmedclip-reference", "size": self.size}

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((self.size, self.size))
        array = np.asarray(resized, dtype=np.float64) / 255  # float64, as numpy's / 255 of the reference
        return torch.from_numpy(array).float().reshape(3, self.size, self.size)  # reshape, not permute


__all__ = [
    "ReferenceClipPixels",
    "ReferenceData",
    "read_plain_pickle",
    "read_reference_checkpoint",
    "read_torch_saved_module",
    "reference_key_map",
]
