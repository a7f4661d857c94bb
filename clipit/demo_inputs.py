"""The demo's inputs, made by one prepare step: `clipit prepare demo --config CONFIG`.

It writes what a real user brings: the images under `data.root` (read by the ordinary `demo` reader,
clipit/data/demo.py::DemoDataset), the unpaired report corpus at `reports.path` (JSONL, read by the
ordinary corpus reader) and the demo CLIP at `pairing.checkpoint` (loaded like any pairing model).
After it, nothing in the stages knows the demo: the readers, their checks and `clipit doctor` are the
ones every dataset gets. The stages that read those inputs (`clipit demo`, `pair`, `shard build`) run
this step first, as torchvision's `download=True` does, and it skips what exists: a report file or a
checkpoint the user put there is never overwritten, so it is checked like any other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from clipit.config import ExperimentConfig
from clipit.data import demo, demo_text
from clipit.data.registry import check_split_names
from clipit.identity import OVERWRITE, changed_output, identity_changes

PREPARE = "clipit prepare demo --config CONFIG"


def _images_current(cfg: ExperimentConfig) -> bool:
    d = cfg.data.demo
    return demo.images_current(Path(cfg.data.root), d.counts, d.image_size, d.seed)


def pending(cfg: ExperimentConfig) -> dict[str, str]:
    """Config key -> path of each input `prepare_demo` would make now (nothing is written): for doctor."""
    out = {}
    if cfg.data.name == "demo" and not _images_current(cfg):
        out["data.root"] = cfg.data.root
    if cfg.data.name == "demo" and not Path(cfg.reports.path).exists():
        out["reports.path"] = cfg.reports.path
    if cfg.pairing.model == "demo-clip" and not Path(cfg.pairing.checkpoint).exists():
        out["pairing.checkpoint"] = cfg.pairing.checkpoint
    return out


def prepare_demo(cfg: ExperimentConfig, log: Callable[[str], None] = print, overwrite: bool = False) -> list[str]:
    """`clipit prepare demo`: make whatever of the demo's inputs the config uses and is missing (or, with
    `overwrite`, was generated with other settings); returns the config keys whose input was made."""
    return prepare_demo_data(cfg, log, overwrite) + prepare_demo_clip(cfg, log)


def _as_config(request: dict) -> dict:
    """A demo folder's record (data/demo.py::image_request) keyed as the config spells its settings."""
    demo_keys = {"counts": request.get("counts"), "image_size": request.get("size"), "seed": request.get("seed")}
    rest = {k: v for k, v in request.items() if k not in ("counts", "size", "seed")}
    return {"data": {"demo": demo_keys}, **rest}


def check_demo_images(cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Demo images generated with other settings are replaced only with `--overwrite`: without it, one line
    naming the changed data.demo keys (the pairs, shards and runs made from them would go stale)."""
    d, meta = cfg.data.demo, Path(cfg.data.root) / demo.META_FILE
    if overwrite or not meta.is_file():
        return
    try:
        stored = json.loads(meta.read_text())
    except (OSError, ValueError):
        return  # an unreadable record is regenerated, as before (nothing made from it can be trusted)
    if not isinstance(stored, dict):
        return
    changes = identity_changes(_as_config(stored), _as_config(demo.image_request(d.counts, d.image_size, d.seed)))
    if changes:
        raise changed_output(
            meta,
            f"the demo images in {cfg.data.root} were generated",
            changes,
            "set data.root (or output_dir) to a new folder",
            f"rerun with `{OVERWRITE}` (e.g. `clipit prepare demo --config <config> {OVERWRITE}`)",
        )


def prepare_demo_data(cfg: ExperimentConfig, log: Callable[[str], None] = print, overwrite: bool = False) -> list[str]:
    """The demo images and report corpus (seconds): the stages make them before they read their inputs."""
    if cfg.data.name != "demo":
        return []
    d = cfg.data.demo
    check_split_names(cfg.data.expected_sizes, tuple(d.counts))  # before anything is written
    check_demo_images(cfg, overwrite)
    made = {k: v for k, v in pending(cfg).items() if k in ("data.root", "reports.path")}
    demo.write_demo_images(Path(cfg.data.root), d.counts, d.image_size, d.seed)
    if not Path(cfg.reports.path).exists():
        demo_text.write_reports_jsonl(Path(cfg.reports.path), demo_text.make_reports(d.n_reports, seed=d.seed + 1))
    return _made(made, log)


def prepare_demo_clip(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> list[str]:
    """The demo CLIP (a minute or more): pairing trains it when it is about to encode, after the images, the
    corpus and the texts passed their checks, and never when the pairs on disk are current."""
    if cfg.pairing.model != "demo-clip" or Path(cfg.pairing.checkpoint).exists():
        return []
    from clipit.pairing import demo_clip

    d = cfg.data.demo
    images, _, captions = demo_text.make_paired_set(d.n_paired, d.image_size, seed=d.seed + 2)
    demo_clip.train_demo_clip(
        images,
        captions,
        Path(cfg.pairing.checkpoint).parent,
        seconds=d.clip_seconds,
        seed=d.seed,
        max_steps=d.clip_steps,
    )
    return _made({"pairing.checkpoint": cfg.pairing.checkpoint}, log)


def _made(made: dict[str, str], log: Callable[[str], None]) -> list[str]:
    if made:
        log("prepared the demo inputs: " + ", ".join(f"{key} {path}" for key, path in made.items()))
    return list(made)
