"""The demo's texts: an external, UNPAIRED colon report corpus whose findings follow the demo classes
(clipit/data/demo.py), and the demo CLIP's separate paired image-caption set, with short figure-legend
captions unlike the reports. Deterministic; each from its own seed stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipit.data.demo import (
    DEMO_CLASSES,
    LYM,
    MUC,
    STR,
    STREAM_PAIRED,
    STREAM_REPORTS,
    TUM,
    balanced_labels,
    render_patches,
)
from clipit.io import atomic_write_text

# Real CAP/registry vocabulary, curated from digital-registrar 0.2.0b4 schemas/data/colorectal.json
# (enums: histology, grade, procedure, primary site, tumor invasion, pT/pN, margins, polyp type, MMR).
HISTOLOGY = (
    "adenocarcinoma",
    "mucinous adenocarcinoma",
    "signet ring cell carcinoma",
    "medullary carcinoma",
    "micropapillary adenocarcinoma",
    "serrated adenocarcinoma",
)
GRADES = ("well differentiated (G1)", "moderately differentiated (G2)", "poorly differentiated (G3)")
PROCEDURES = (
    "right hemicolectomy",
    "extended right hemicolectomy",
    "left hemicolectomy",
    "low anterior resection",
    "anterior resection",
    "abdominoperineal resection",
    "total colectomy",
    "subtotal colectomy",
    "segmental colectomy",
    "transanal local excision",
    "polypectomy",
)
SITES = (
    "cecum",
    "ascending colon",
    "hepatic flexure",
    "transverse colon",
    "splenic flexure",
    "descending colon",
    "sigmoid colon",
    "rectosigmoid junction",
    "rectum",
)
INVASION = ("submucosa", "muscularis propria", "pericolorectal tissue", "visceral peritoneum surface")
PT, PN = ("pT1", "pT2", "pT3", "pT4a"), ("pN0", "pN1a", "pN1b", "pN1c", "pN2a", "pN2b")
MARGINS = ("proximal", "distal", "radial (circumferential)", "mesenteric")
POLYPS = ("tubular adenoma", "tubulovillous adenoma", "sessile serrated adenoma", "villous adenoma")
MMR = ("MLH1", "MSH2", "MSH6", "PMS2")

# Per class: (diagnosis lines, microscopic descriptions, short "also present" mentions for noisy reports).
_DX = {
    TUM: ("invasive {hist}, {grade}", "{hist}, {grade}, invading {inv}", "{hist} arising in a {polyp}, {grade}"),
    LYM: (
        "{k} lymph nodes, negative for metastatic carcinoma (0/{k})",
        "reactive lymphoid hyperplasia",
        "lymph node with follicular hyperplasia, no tumor seen",
        "dense chronic lymphocytic infiltrate",
    ),
    STR: (
        "dense fibrous stroma, no residual carcinoma",
        "submucosal fibrosis",
        "desmoplastic stromal reaction",
        "fibrotic connective tissue, negative for malignancy",
    ),
    MUC: (
        "benign colonic mucosa, negative for dysplasia",
        "unremarkable colonic mucosa",
        "normal colonic mucosa with preserved crypt architecture",
        "benign colonic mucosa, no {polyp} or malignancy identified",
    ),
}
_MICRO = {
    TUM: (
        "crowded malignant glands lined by large pleomorphic hyperchromatic nuclei",
        "sheets of atypical cells with enlarged, crowded, hyperchromatic nuclei and prominent nucleoli",
        "marked nuclear pleomorphism, nuclear crowding and numerous mitoses",
        "enlarged irregular dark nuclei with loss of polarity in crowded cribriform glands",
    ),
    LYM: (
        "dense sheets of small round mature lymphocytes",
        "numerous small dark round lymphocytes",
        "lymphoid tissue packed with small round lymphocytes and reactive follicles",
        "dense lymphocytic infiltrate of small round cells with dark nuclei",
    ),
    STR: (
        "pink collagenous stroma with sparse elongated spindle cells",
        "scattered bland spindle-shaped fibroblasts in dense pink fibrous stroma",
        "wavy collagen fibres with few elongated spindle nuclei",
        "paucicellular fibrous tissue with thin spindle cells",
    ),
    MUC: (
        "regular crypts with round pale lumens lined by a single layer of basal nuclei",
        "evenly spaced glands with goblet cells and small basally located nuclei around the lumen",
        "intact crypt architecture, glands arranged around open lumens with bland nuclei",
        "round crypts with mucin-rich goblet cells and a ring of small regular nuclei",
    ),
}
_ALSO = {
    TUM: "foci of crowded pleomorphic tumor cells",
    LYM: "a prominent lymphocytic infiltrate",
    STR: "areas of fibrous spindle cell stroma",
    MUC: "adjacent benign crypts with round lumens",
}
_HEAD = (
    "FINAL DIAGNOSIS: {site}, {proc}: {dx}.",
    "DIAGNOSIS: {Site} ({proc}) - {dx}.",
    "Colon, {site}, {proc}: {Dx}.",
    "PATHOLOGIC DIAGNOSIS: {Dx}; {site}, {proc}.",
)
_MICRO_HEAD = ("Microscopic: {m}.", "Sections show {m}.", "MICROSCOPIC DESCRIPTION: {m}.", "Histology shows {m}.")


def _tail(rng: np.random.Generator, label: int, rid: str, site: str) -> str:
    """Boilerplate after the diagnosis (mostly truncated away by 77-token text encoders)."""
    c = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    parts = [
        f"Specimen {rid} received in formalin labeled with the patient's name, {site}.",
        f"GROSS DESCRIPTION: a segment of bowel measuring {rng.uniform(8, 35):.1f} cm in length and "
        f"{rng.uniform(2, 6):.1f} cm in circumference; representative sections submitted in "
        f"{int(rng.integers(6, 24))} cassettes.",
    ]
    if label == TUM:
        depth = int(rng.integers(len(INVASION)))  # invasion depth and pT agree (AJCC)
        parts += [
            f"Tumor invades {INVASION[depth]} ({PT[depth]}, {c(PN)}).",
            f"Lymphovascular invasion: {c(('present', 'not identified'))}. "
            f"Perineural invasion: {c(('present', 'not identified'))}.",
            f"Mismatch repair immunohistochemistry: {', '.join(MMR)} {c(('intact', 'lost (MLH1/PMS2)'))}.",
        ]
    parts.append(f"Margins: {c(MARGINS)} and other margins free, closest {int(rng.integers(2, 60))} mm.")
    parts.append(
        c(
            (
                "COMMENT: clinical history reviewed.",
                "Slides reviewed at consensus conference.",
                "Synoptic report per CAP protocol for colon and rectum.",
                "Correlation with imaging suggested.",
            )
        )
    )
    return " ".join(parts)


def make_reports(n: int, seed: int = 0) -> list[dict]:
    """External, UNPAIRED colon report corpus; each report's findings follow one demo class, ~15% mix two."""
    rng = np.random.default_rng([seed, STREAM_REPORTS])
    c = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    reports = []
    for i, label in enumerate(balanced_labels(n, rng)):
        label, site = int(label), c(SITES)
        dx = c(_DX[label]).format(
            hist=c(HISTOLOGY), grade=c(GRADES), inv=c(INVASION), polyp=c(POLYPS), k=int(rng.integers(5, 25))
        )
        head = c(_HEAD).format(site=site, Site=site.capitalize(), proc=c(PROCEDURES), dx=dx, Dx=dx[0].upper() + dx[1:])
        m1, m2 = rng.choice(_MICRO[label], 2, replace=False)
        m = f"{m1}; {m2}" if rng.random() < 0.5 else m1  # sometimes two descriptions: more varied wording
        micro = c(_MICRO_HEAD).format(m=m)
        if rng.random() < 0.15:  # ambiguity: features of a second class
            other = int(rng.choice([k for k in range(len(DEMO_CLASSES)) if k != label]))
            micro += f" Also {_ALSO[other]}."
        rid = f"DEMO-R{i + 1:04d}"
        text = f"{head} {micro} {_tail(rng, label, rid, site)}"
        reports.append({"id": rid, "text": text, "organ": "colon", "demo_class": DEMO_CLASSES[label]})
    return reports


_CAP_MORPH = {
    TUM: (
        "large pleomorphic hyperchromatic nuclei",
        "crowded atypical tumor cells",
        "malignant glands with enlarged dark nuclei",
        "nuclear crowding and pleomorphism",
        "invasive adenocarcinoma cells with prominent nucleoli",
    ),
    LYM: (
        "small round lymphocytes",
        "densely packed small dark nuclei",
        "sheets of mature lymphocytes",
        "a dense lymphocytic infiltrate",
        "lymphoid tissue with small round cells",
    ),
    STR: (
        "sparse elongated spindle cells",
        "pink fibrous collagen",
        "wavy collagen fibres with fibroblasts",
        "paucicellular fibrous stroma",
        "thin spindle-shaped nuclei in pink stroma",
    ),
    MUC: (
        "regular crypts around pale lumens",
        "benign glands lined by basal nuclei",
        "goblet cells in evenly spaced crypts",
        "normal colonic mucosa",
        "round gland lumens ringed by small nuclei",
    ),
}
_CAP_TPL = (
    "H&E photomicrograph of {a}.",
    "{A} and {b}, H&E, {mag}.",
    "High-power view showing {a} with {b}.",
    "Histology image: {a}; {b}.",
    "Colon tissue with {a} ({mag}).",
    "{A}.",
)


def make_captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Short figure-legend style captions (unlike the reports), two morphology phrases per image."""
    out = []
    for lab in np.asarray(labels):
        a, b = rng.choice(_CAP_MORPH[int(lab)], 2, replace=False)
        mag = ("20x", "40x", "10x")[int(rng.integers(3))]
        tpl = _CAP_TPL[int(rng.integers(len(_CAP_TPL)))]
        out.append(tpl.format(a=a, b=b, A=a[0].upper() + a[1:], mag=mag))
    return out


def write_reports_jsonl(path: Path, reports: list[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in reports))
    return path


def make_paired_set(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A paired image-caption set from its own seed stream: the demo CLIP's "other dataset"."""
    rng = np.random.default_rng([seed, STREAM_PAIRED])
    labels = balanced_labels(n, rng)
    return render_patches(labels, size, rng), labels, make_captions(labels, rng)
