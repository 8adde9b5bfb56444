"""Data layer: loaders -> one canonical schema -> preprocessing report, splits, manifest, leakage checks."""

from llmrec.data.loaders import BUILTIN, DataError, RawData, load_raw
from llmrec.data.prepare import (
    PrepareConfig,
    PreparedDataset,
    dataset_dir,
    load_prepared,
    prepare,
    title_twins,
    with_title_twins,
)

__all__ = [
    "BUILTIN",
    "DataError",
    "PrepareConfig",
    "PreparedDataset",
    "RawData",
    "dataset_dir",
    "load_prepared",
    "load_raw",
    "prepare",
    "title_twins",
    "with_title_twins",
]
