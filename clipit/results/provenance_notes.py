"""The report's provenance footnotes: what the runs of a table were computed with (each run's
provenance.json, clipit/provenance.py), stated once when every run agrees, and the runs named when
they do not (another commit, package version, device, precision or weights file content).

Only facts that should agree across a table are compared: the config hash, the training shards and a
warm start's weights differ from cell to cell by design. A weights file is compared per location (two
backbones are two facts), so a re-downloaded checkpoint with other bytes is named.
"""

from __future__ import annotations

from clipit.methods import role_method
from clipit.provenance import read_provenance
from clipit.results.runs import MAIN_VARIANTS, Run

COMPARED_WEIGHTS = ("backbone", "pairing")  # a warm start's weights differ per cell by design


def run_facts(record: dict) -> dict[str, str]:
    """A provenance record as {fact: value} strings, the facts a table's runs should share."""
    git = (record.get("clipit") or {}).get("git") or {}
    commit = (git.get("commit", "")[:12] + ("+dirty" if git.get("dirty") else "")) if git else "no git checkout"
    device = record.get("device") or {}
    facts = {
        "clipit": f"{(record.get('clipit') or {}).get('version', '?')} ({commit})",
        "python": str(record.get("python", "?")),
        **{name: str(version) for name, version in sorted((record.get("packages") or {}).items())},
        "device": f"{device.get('processes', 1)} x {device.get('type', '?')} {device.get('name', '')}".rstrip(),
        "precision": str(record.get("precision") or "?"),
    }
    for role, weights in sorted((record.get("weights") or {}).items()):
        if role in COMPARED_WEIGHTS and weights and weights.get("location"):
            sha = weights.get("sha256")
            facts[f"{role} weights {weights['location']}"] = f"sha256 {sha[:12]}" if sha else "not hashed (not a file)"
    return facts


def cell_name(run: Run) -> str:
    variant = f" {run.variant}" if run.variant not in MAIN_VARIANTS else ""
    return f"{run.backbone}/{run.dataset} {run.method}{variant} seed {run.seed}"


def provenance_notes(facts: dict[str, dict[str, str]], missing: list[str] = ()) -> list[str]:
    """Footnote lines from {run name: facts}: one line with every fact all runs share, then one line per
    fact that differs, naming the runs off the most common value; then the runs without provenance."""
    notes = []
    if facts:
        keys = list(dict.fromkeys(k for f in facts.values() for k in f))
        shared, differing = [], []
        for key in keys:
            values: dict[str, list[str]] = {}
            for name, f in facts.items():
                if key in f:  # a fact a run does not have (e.g. no pairing model) is not a difference
                    values.setdefault(f[key], []).append(name)
            if len(values) == 1:
                shared.append(f"{key} {next(iter(values))}")
                continue
            ranked = sorted(values.items(), key=lambda kv: -len(kv[1]))
            common, rest = ranked[0], ranked[1:]
            named = "; ".join(f"{value} in {', '.join(names)}" for value, names in rest)
            differing.append(f"{key} differs: {named}; {common[0]} in the other {len(common[1])} run(s)")
        notes.append(f"Provenance ({len(facts)} runs): " + ", ".join(shared) + ".")
        notes += [d + "." for d in differing]
    if missing:
        notes.append(f"No provenance.json (runs from before it was recorded): {', '.join(missing)}.")
    return notes


def runs_notes(runs: list[Run]) -> list[str]:
    """provenance_notes over `runs`, read from their run folders."""
    facts, missing = {}, []
    for run in runs:
        record = read_provenance(run.path)
        if record is None:
            missing.append(cell_name(run))
        else:
            facts[cell_name(run)] = run_facts(record)
    return provenance_notes(facts, missing)


def table1_runs(runs: list[Run]) -> list[Run]:
    """The runs Table 1 (and its gains and comparison) are computed from: the main probe and CLIP-IT runs."""
    kinds = (role_method("probe"), role_method("proposed"))
    return [r for r in runs if r.variant in MAIN_VARIANTS and r.kind in kinds]
