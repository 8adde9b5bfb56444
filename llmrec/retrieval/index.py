"""faiss inner-product indexes over L2-normalised item vectors: exact (`flat`, default) or `ivf` for large
catalogues; saved next to a small meta.json that says what they were built from."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmrec.data.prepare import replace_atomic

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf"]


def build_index(vectors: np.ndarray, kind: IndexKind = "flat", nlist: int | None = None, nprobe: int = 8,
                seed: int = 0) -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nl = int(nlist or max(1, min(4096, int(4 * np.sqrt(n)))))
        nl = min(nl, max(1, n // 39)) if n >= 39 else 1  # faiss wants >= 39 training points per list
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nl, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.nprobe = min(nprobe, nl)
    else:
        raise ValueError(f"unknown index kind {kind!r}: use 'flat' or 'ivf'")
    index.add(x)
    return index


def _index_file(meta: dict) -> str:
    """The index's file name, named by a digest of its meta: a meta.json can only ever point at the index it
    describes, even when two processes save different indexes into one folder at once."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"index-{digest}.faiss"


def save_index(index: Any, folder: Path, meta: dict) -> None:
    """Write the index under a name derived from `meta`, then meta.json (each by an atomic rename); older index
    files of the folder are removed."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    name = _index_file(meta)
    replace_atomic(folder / name, lambda tmp: faiss.write_index(index, str(tmp)))
    text = json.dumps({**meta, "index_file": name}, indent=2)
    replace_atomic(folder / "meta.json", lambda tmp: tmp.write_text(text))
    for old in folder.glob("index*.faiss"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_index(folder: Path, expect: dict) -> Any | None:
    """The saved index when its meta.json matches `expect` (same texts, model, kind), else None."""
    mp = folder / "meta.json"
    if not mp.is_file():
        return None
    try:
        meta = json.loads(mp.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        log.warning("%s is not a JSON object: rebuilding the index", mp)
        return None
    if any(meta.get(k) != v for k, v in expect.items()) or meta.get("index_file") != _index_file(expect):
        return None  # another build's index, or a folder written before index files were named by their meta
    ip = folder / meta["index_file"]
    if not ip.is_file():
        return None
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    try:
        index = faiss.read_index(str(ip))
    except RuntimeError as e:
        log.warning("index %s unreadable (%s): rebuilding", ip, e)
        return None
    if "n_items" in expect and index.ntotal != int(expect["n_items"]):
        log.warning("index %s holds %d vectors, not %d: rebuilding", ip, index.ntotal, expect["n_items"])
        return None
    if "nprobe" in meta and hasattr(index, "nprobe"):
        index.nprobe = int(meta["nprobe"])
    return index
