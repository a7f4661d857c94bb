"""What the images are paired with: the report corpus (the paper), or class-prompt texts (an ablation).

Class prompts follow the reference code's `map_prompt_*.py`: CONCH's 22 zero-shot templates × one name
per class, each prompt one "text" in the pairing corpus. The class names are those of the reference's
CLIP baselines (method.md §4), listed here in OUR label order (BACH: eva's Benign, InSitu, Invasive,
Normal; the reference's own list is ordered differently, method.md §8.7).
"""

from __future__ import annotations

from collections.abc import Sequence

from clipit.corpus import CorpusError, Report

# CONCH's prompt templates (mahmoodlab/CONCH, prompts/*.json and the zero-shot notebooks).
CONCH_TEMPLATES = (
    "CLASSNAME.",
    "a photomicrograph showing CLASSNAME.",
    "a photomicrograph of CLASSNAME.",
    "an image of CLASSNAME.",
    "an image showing CLASSNAME.",
    "an example of CLASSNAME.",
    "CLASSNAME is shown.",
    "this is CLASSNAME.",
    "there is CLASSNAME.",
    "a histopathological image showing CLASSNAME.",
    "a histopathological image of CLASSNAME.",
    "a histopathological photograph of CLASSNAME.",
    "a histopathological photograph showing CLASSNAME.",
    "shows CLASSNAME.",
    "presence of CLASSNAME.",
    "CLASSNAME is present.",
    "an H&E stained image of CLASSNAME.",
    "an H&E stained image showing CLASSNAME.",
    "an H&E image showing CLASSNAME.",
    "an H&E image of CLASSNAME.",
    "CLASSNAME, H&E stain.",
    "CLASSNAME, H&E.",
)

# Per dataset, in the reader's label order.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "pcam": ("normal", "tumor"),
    "bach": ("benign", "in situ carcinoma", "invasive carcinoma", "normal"),
    "crc": (
        "adipose tissue",
        "background",
        "debris (necrosis, mucus, hemorrhage)",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
}


def class_names_for(dataset_name: str, classes: Sequence[str], override: Sequence[str] | None = None) -> list[str]:
    """Prompt names per label: `override` (pairing.class_names), the table above, or the class ids."""
    if override:
        names = [str(n) for n in override]
        if len(names) != len(classes):
            raise CorpusError(
                f"pairing.class_names has {len(names)} names but dataset {dataset_name!r} has "
                f"{len(classes)} classes {list(classes)}; give one name per class, in that order"
            )
        return names
    known = CLASS_NAMES.get(dataset_name)
    if known is not None and len(known) == len(classes):
        return list(known)
    return [str(c).replace("_", " ") for c in classes]


def class_prompt_texts(
    dataset_name: str,
    classes: Sequence[str],
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = CONCH_TEMPLATES,
) -> list[Report]:
    """len(classes) × len(templates) prompts, class-major; ids `prompt-<label>-<template>`."""
    if not classes:
        raise CorpusError(f"dataset {dataset_name!r} has no classes to build class prompts from")
    names = class_names_for(dataset_name, classes, class_names)
    return [
        Report(
            id=f"prompt-{label:03d}-{t:02d}",
            text=template.replace("CLASSNAME", name),
            # demo_class: the key pipeline.class_agreement reads (the text's class id, any dataset)
            meta={"label": label, "class": str(classes[label]), "demo_class": str(classes[label]), "template": t},
        )
        for label, name in enumerate(names)
        for t, template in enumerate(templates)
    ]


def pairing_texts(cfg, dataset, reports: list[Report]) -> list[Report]:
    """The texts that pairing searches for this config: `pairing.texts` = reports | class_prompts."""
    if cfg.pairing.texts == "class_prompts":
        return class_prompt_texts(dataset.name, dataset.classes, cfg.pairing.class_names)
    if not reports:
        raise CorpusError(
            f"{cfg.reports.path}: the report corpus is empty; check reports.path and its filters "
            "(reports.organ, reports.projects)"
        )
    return reports
