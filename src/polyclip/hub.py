"""Released checkpoints by name (``registry.toml``) and their download through huggingface_hub.

With a network, a registry name or ``hf-hub:org/repo`` downloads into huggingface_hub's cache.
Offline (no network, or ``HF_HUB_OFFLINE=1``) the cache is used; if the files are not there the error
says what to download and where to put it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


class ModelNotFoundError(LookupError):
    """A name is neither a registry entry, a hub id nor a local path, or its files are unavailable."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    hub_id: str
    format: str
    architecture: str
    preprocess: str | dict[str, Any]
    tokenizer: dict[str, Any]
    license: str
    system: str = ""
    task: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What `polyclip models` shows of the entry (its ``--json`` and its table alike)."""
        return {
            "system": self.system,
            "hub_id": self.hub_id,
            "format": self.format,
            "architecture": self.architecture,
            "preprocess": self.preprocess,
            "preprocessing": _describe_preprocess(self.preprocess),
            "tokenizer": self.tokenizer,
            "tokenization": _describe_tokenizer(self.tokenizer),
            "license": self.license,
            "task": self.task,
        }


def _describe_preprocess(spec: str | dict[str, Any]) -> str:
    """``"clip"`` (a preset) or an inline table, in a few words: ``shortest 336px bicubic``."""
    if isinstance(spec, str):
        return f"{spec} preset"
    words = [str(spec.get("resize_mode", "shortest"))]
    if "image_size" in spec:
        words.append(f"{spec['image_size']}px")
    if "interpolation" in spec:
        words.append(str(spec["interpolation"]))
    return " ".join(words)


def _describe_tokenizer(spec: dict[str, Any]) -> str:
    """``{type = "clip", context_length = 77}`` -> ``clip BPE, 77 tokens``."""
    kind = {"clip": "CLIP BPE", "siglip": "SentencePiece", "folder": "the repo's own"}.get(
        spec.get("type", ""), str(spec.get("type"))
    )
    return f"{kind}, {spec['context_length']} tokens" if "context_length" in spec else kind


@lru_cache(maxsize=1)
def registry() -> dict[str, RegistryEntry]:
    text = resources.files("polyclip").joinpath("registry.toml").read_text()
    entries = {}
    for name, data in tomllib.loads(text).items():
        known = {k: data.pop(k) for k in list(data) if k in RegistryEntry.__dataclass_fields__}
        entries[name] = RegistryEntry(name=name, extra=data, **known)
    return entries


def list_models() -> list[str]:
    return sorted(registry())


def registry_entry(name: str) -> RegistryEntry | None:
    """The entry of a registry name as a user may type it: ``PLIP``, ``Clip-ViT-B-32`` and ``plip`` alike."""
    entries = registry()
    if name in entries:
        return entries[name]
    folded = {key.casefold(): entry for key, entry in entries.items()}
    return folded.get(name.strip().casefold())


def suggestions(text: str) -> list[str]:
    """What a user probably meant by a name that is not a path, a registry name or an hf-hub id.

    - a bare hub id (``openai/clip-vit-base-patch32``): its ``hf-hub:`` form, and the registry entry
      that points at that repository;
    - an architecture name (``ViT-B-32``): random weights through ``polyclip.create_model`` (or
      ``create_model_and_transforms``), and the released checkpoints of that architecture;
    - anything else: the registry names and hub ids closest to it (difflib).
    """
    import difflib

    entries = registry()
    folded = text.strip().casefold()
    hints: list[str] = []
    if "/" in text and not text.startswith(("hf-hub:", ".", "/", "~")) and text.count("/") == 1:
        hints.append(f"'hf-hub:{text.strip('/')}' (a Hugging Face repository)")
        hints += [f"{name!r} (the registry name of {e.hub_id})" for name, e in entries.items()
                  if e.hub_id.casefold() == folded.strip("/")]  # fmt: skip
    from polyclip.models import list_architectures

    architectures = {name.casefold(): name for name in list_architectures()}
    if folded in architectures:
        arch = architectures[folded]
        hints.append(
            f"polyclip.create_model({arch!r}) or polyclip.create_model_and_transforms({arch!r}) "
            "(the architecture, with random weights)"
        )
        hints += [f"{name!r} (released {arch} weights)" for name, e in sorted(entries.items())
                  if e.architecture == arch]  # fmt: skip
    if not hints:
        by_key = {name.casefold(): repr(name) for name in entries}
        by_key |= {e.hub_id.casefold(): f"'hf-hub:{e.hub_id}'" for e in entries.values()}
        close = difflib.get_close_matches(folded, list(by_key), n=3, cutoff=0.6)
        hints += list(dict.fromkeys(by_key[key] for key in close))
    return hints


# Which files each format needs from a hub repository
_PATTERNS = {
    "hf": [
        "config.json",
        "preprocessor_config.json",
        "tokenizer*",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "spiece.model",
    ],
    "open_clip": ["open_clip_config.json"],
    "flax": ["config.json", "flax_model.msgpack", "preprocessor_config.json"],
}
_WEIGHTS = {
    "hf": [
        "model.safetensors",
        "model.safetensors.index.json",
        "model-*.safetensors",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "pytorch_model-*.bin",
    ],
    "open_clip": ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
    "flax": [],
}


def _offline() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub's host cannot be reached within a few seconds.

    Asking first spares a user without a network huggingface_hub's retries (tens of seconds).
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


def _weight_patterns(repo_id: str, format: str) -> list[str]:
    """Prefer safetensors: ask the hub which weight files exist, so a repo's .bin twin is not fetched too."""
    candidates = _WEIGHTS.get(format, [])
    try:
        from huggingface_hub import list_repo_files

        files = set(list_repo_files(repo_id))
    except Exception:
        return candidates
    safetensors = [p for p in candidates if "safetensors" in p]
    import fnmatch

    if any(fnmatch.fnmatch(f, p) for f in files for p in safetensors):
        return safetensors
    return candidates


def download(repo_id: str, format: str = "hf", name: str | None = None) -> Path:
    """Local folder holding the repo's files for ``format``: downloaded, or from the cache offline."""
    from huggingface_hub import snapshot_download

    patterns = _PATTERNS.get(format, ["*"])
    # read at call time: huggingface_hub reads its environment once, at import
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    label = f"{name!r} ({repo_id})" if name else repo_id
    try:  # a complete cached snapshot needs no network
        cached = Path(
            snapshot_download(
                repo_id,
                allow_patterns=patterns + _WEIGHTS.get(format, []),
                local_files_only=True,
                cache_dir=cache_dir,
            )
        )
        if any(cached.glob("*.safetensors")) or any(cached.glob("*.bin")) or any(cached.glob("*.msgpack")):
            return cached
    except Exception:
        pass
    if not _offline():
        try:
            return Path(
                snapshot_download(
                    repo_id, allow_patterns=patterns + _weight_patterns(repo_id, format), cache_dir=cache_dir
                )
            )
        except Exception as error:  # no network, or the hub refused: try the cache before giving up
            online_error = error
    else:
        online_error = None
    reason = (
        f" ({type(online_error).__name__}: {str(online_error).splitlines()[0][:200]})" if online_error else ""
    )
    raise ModelNotFoundError(
        f"model {label} is not in the local Hugging Face cache and the hub cannot be reached{reason}.\n"
        f"Download it where a network exists:  hf download {repo_id}\n"
        "then copy the cache folder (~/.cache/huggingface/hub, or $HF_HOME/hub) to this machine, "
        "or download into a folder and pass that folder's path to polyclip.load()."
    )


def hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo: from huggingface_hub's cache, downloaded when a network exists.

    Offline (``HF_HUB_OFFLINE=1`` or the hub unreachable) a file that is not cached raises
    ModelNotFoundError saying what to download.
    """
    from huggingface_hub import hf_hub_download

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True, cache_dir=cache_dir))
    except Exception:
        pass
    online_error = None
    if not _offline():
        try:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
        except Exception as error:
            online_error = error
    reason = (
        f" ({type(online_error).__name__}: {str(online_error).splitlines()[0][:200]})" if online_error else ""
    )
    raise ModelNotFoundError(
        f"{filename} of {repo_id} is not in the local Hugging Face cache and the hub cannot be reached{reason}.\n"
        f"Download it where a network exists:  hf download {repo_id} {filename}\n"
        "then copy the cache folder (~/.cache/huggingface/hub, or $HF_HOME/hub) to this machine, "
        "or put the file in the checkpoint folder."
    )


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, RegistryEntry | None, str | None]:
    """(local path, registry entry or None, format or None) for a registry name, hub id or path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path, None, None
    entry = registry_entry(text)
    if entry is not None:
        return download(entry.hub_id, entry.format, name=entry.name), entry, entry.format
    if text.startswith("hf-hub:"):
        repo_id = text.removeprefix("hf-hub:").strip("/")
        for format in ("open_clip", "hf"):
            try:
                folder = download(repo_id, format)
            except ModelNotFoundError:
                if format == "hf":
                    raise
                continue
            if any(folder.iterdir()):
                return folder, None, None
    hints = suggestions(text)
    hint = f" Did you mean {'; '.join(hints)}?" if hints else ""
    raise ModelNotFoundError(
        f"{text!r} is not a local path, a registry name or an 'hf-hub:org/repo' id.{hint} "
        "`polyclip models` lists the registry."
    )
