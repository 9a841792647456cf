"""Vector index of image collections: FAISS vectors, SQLite metadata, the model identity in index.json.

    from polyclip.index import Encoder, Index, build
    build(["photos/"], "clip-vit-b-32", "my-index")
    encoder = Encoder.load("clip-vit-b-32")
    with Index("my-index") as index:
        hits = index.search(encoder.encode_texts(["a red bicycle"]), k=10)[0]

Requires FAISS (``pip install 'polyclip[serve]'``).
"""

from polyclip.index.build import BuildOptions, BuildReport, add_paths, add_to_index, build, remove_from_index
from polyclip.index.captions import Annotation, read_captions
from polyclip.index.encoder import Encoder, QueryEmbeddings
from polyclip.index.errors import IndexBusyError, IndexStoreError, ModelMismatchError
from polyclip.index.identity import ModelIdentity, weights_fingerprint
from polyclip.index.index import Index, SearchHit, open_index
from polyclip.index.store import NewItem
from polyclip.index.vectors import IndexSpec, VectorIndexConfig

__all__ = [
    "Annotation",
    "BuildOptions",
    "BuildReport",
    "Encoder",
    "Index",
    "IndexBusyError",
    "IndexSpec",
    "IndexStoreError",
    "ModelIdentity",
    "ModelMismatchError",
    "NewItem",
    "QueryEmbeddings",
    "SearchHit",
    "VectorIndexConfig",
    "add_paths",
    "add_to_index",
    "build",
    "open_index",
    "read_captions",
    "remove_from_index",
    "weights_fingerprint",
]
