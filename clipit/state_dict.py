"""The one strict state-dict loader: every tensor must fit, or one error line says what does not.

Silent partial loads hide the worst bugs (CONCH's own loader uses strict=False and would pair with
random weights), so pretrained backbones, pairing models and exported models all load through
`load_strict`; a run's own checkpoints load a chosen subset through `copy_matching`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def mismatch(expected: Mapping[str, torch.Tensor], state: Mapping, ignore_unexpected: Iterable[str] = ()) -> str:
    """'' when `state` has exactly the keys and shapes of `expected`, else a short description."""
    ignore = set(ignore_unexpected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignore]
    shapes = [
        f"{k} {tuple(getattr(state[k], 'shape', ()))} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)
    ]
    parts = [
        f"{len(found)} {label} (e.g. {found[0]})"
        for found, label in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        if found
    ]
    return f"{len(expected)} tensors expected, " + ", ".join(parts) if parts else ""


def load_strict(
    model: nn.Module,
    state: Mapping,
    where,
    what: str,
    hint: str,
    error: type[Exception],
    ignore_unexpected: Iterable[str] = (),
) -> None:
    """model.load_state_dict(state, strict=True), or `error` naming `where`, `what` did not fit and `hint`."""
    ignore = tuple(ignore_unexpected)
    expected = model.state_dict()
    problem = mismatch(expected, state, ignore)
    if problem:
        raise error(f"{where}: does not fit {what} ({problem}); {hint}")
    model.load_state_dict({k: v for k, v in state.items() if k not in ignore or k in expected}, strict=True)


def copy_matching(
    model: nn.Module, state: Mapping[str, torch.Tensor], where, hint: str, error: type[Exception]
) -> list[str]:
    """Copy every tensor of `state` into the parameter or buffer of the same name (a subset is fine;
    a key the model lacks or a tensor of another shape is `error`). Returns the loaded keys."""
    own = model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise error(f"{where}: {len(bad)} saved tensors do not fit the model (e.g. {bad[:3]}); {hint}")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)
    return sorted(state)
