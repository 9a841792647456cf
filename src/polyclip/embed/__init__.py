"""``polyclip embed``: embeddings of a collection written to Parquet (the ``data`` extra: pyarrow).

pyarrow is needed here only, so it lives in its own subpackage that only the ``embed`` command and
callers who want Parquet output import; ``import polyclip`` never pulls it in.
"""

from polyclip.embed.parquet import embed_to_parquet

__all__ = ["embed_to_parquet"]
