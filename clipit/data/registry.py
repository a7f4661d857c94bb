"""Dataset names (config ``data.name``) -> reader classes. Extend DATASETS to add one."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipit.data.bach import BACHDataset
from clipit.data.base import DatasetError, ImageDataset
from clipit.data.crc import CRCDataset
from clipit.data.folder import ImageFolderDataset
from clipit.data.pcam import PCamDataset

# Each factory is called as factory(root, **kwargs).
DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "pcam": PCamDataset,
    "crc": CRCDataset,
    "bach": BACHDataset,
    "folder": ImageFolderDataset,
}


def build_dataset(name: str, root: str | Path, **kwargs: Any) -> ImageDataset:
    factory = DATASETS.get(str(name).lower())
    if factory is None:
        raise DatasetError(f"unknown dataset {name!r}; set data.name to one of {sorted(DATASETS)}")
    # A misspelt config key should say which keys exist, not raise a bare TypeError.
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [k for k in params if k not in ("self", "root")]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise DatasetError(f"dataset {name!r} does not take option(s) {unknown}; it takes {allowed}")
    return factory(root, **kwargs)
