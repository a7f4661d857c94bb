"""Run identity: the one comparison every stage makes before it reuses an output that already exists.

Each stage records, next to its completion marker, the config settings its output depends on (its
identity, keyed as the config spells them: `methods.clipit.lr`, `pairing.top_k`, `shards.codec`). A
rerun computes the identity it is asked for and compares: equal, the output is reused; different, the
stage stops with one line naming the changed keys (old then, new now) and the two ways forward: another
output folder keeps the old output, `--overwrite` replaces it. Which keys count per stage, and what
`--overwrite` does there: docs/reliability.md ("Reruns: run identity everywhere").
"""

from __future__ import annotations

import json

from clipit.errors import ClipitError

OVERWRITE = "--overwrite"  # the one flag name for "replace an output made under another config"
UNSET = "<unset>"


class OutputChanged(ClipitError):
    """An existing output was made under another config than the one requested now."""


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _plain(tree) -> dict:
    """A JSON round trip: what a stored identity reads back as (tuples become lists, paths strings)."""
    return _flat(json.loads(json.dumps(tree, default=str)))


def changed_keys(then: dict, now: dict) -> list[str]:
    """The dotted keys whose values differ between two identities, sorted."""
    then, now = _plain(then), _plain(now)
    same = lambda k: json.dumps(then.get(k, UNSET)) == json.dumps(now.get(k, UNSET))  # noqa: E731 (NaN == NaN)
    return sorted(k for k in then.keys() | now.keys() if not same(k))


def identity_changes(then: dict, now: dict, limit: int = 4) -> str:
    """The keys whose values differ between two identities, as `key: old then, new now` ('' if none)."""
    changed = changed_keys(then, now)
    then, now = _plain(then), _plain(now)
    detail = ", ".join(f"{k}: {then.get(k, UNSET)!r} then, {now.get(k, UNSET)!r} now" for k in changed[:limit])
    return detail + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def changed_output(where, what: str, changes: str, keep: str, replace: str) -> OutputChanged:
    """The one line of a reused output made under another config: `where` (the file that records the old
    identity), `what` was made (e.g. "unimodal seed 0 finished"), the changes, then how to keep the old
    output (another folder) and how to replace it (a command with `--overwrite`)."""
    return OutputChanged(
        f"{where}: {what} under another config ({changes}); to keep it, {keep}; to replace it, {replace}"
    )


def check_unchanged(where, stored: dict | None, requested: dict, what: str, keep: str, replace: str) -> None:
    """Raise `changed_output` unless `stored` equals `requested`; an output that recorded no identity
    (written before identities were stored) passes: callers decide how far they trust it."""
    if stored is None:
        return
    changes = identity_changes(stored, requested)
    if changes:
        raise changed_output(where, what, changes, keep, replace)
