"""What ties a run's frozen_eval.json to the training it scored: the sha256 of the run's train_summary.json
(rewritten by every training, wall time included). A record made for an earlier training of the same run
folder (a retrained cell) is stale: `clipit evaluate --frozen` computes it again, and the report leaves it
out. Light imports: `clipit reproduce` asks this per cell before it queues anything."""

from __future__ import annotations

from pathlib import Path

from clipit import layout
from clipit.errors import ClipitError
from clipit.io import read_json_object, sha256_file

TRAINED = "train_summary_sha256"


def training_stamp(run_dir: str | Path) -> str | None:
    """The stamp of the run's current training; None when it is not trained."""
    path = layout.train_summary(run_dir)
    return sha256_file(path) if path.is_file() else None


def stale_reason(run_dir: str | Path, record: dict) -> str:
    """Why `record` (a frozen_eval.json's content) does not score the run's current training ("" when it does)."""
    stamp = training_stamp(run_dir)
    if stamp is None:
        return f"{layout.train_summary(run_dir)} is missing: the run is not trained"
    if record.get(TRAINED) != stamp:
        return f"it was computed for another training than {layout.train_summary(run_dir)}"
    return ""


def current_record(run_dir: str | Path) -> dict | None:
    """The run's frozen_eval.json when it scores the run's current training; None when it is missing,
    unreadable (computed again) or stale."""
    try:
        record = read_json_object(layout.frozen_eval_file(run_dir), missing_ok=True)
    except ClipitError:
        return None
    return record if record is not None and not stale_reason(run_dir, record) else None


def is_current(run_dir: str | Path) -> bool:
    """Whether the run has a frozen_eval.json for its current training."""
    return current_record(run_dir) is not None
