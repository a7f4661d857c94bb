"""Where a model's pretrained weights come from: an explicit setting, a weights file, or a hub.

Compute nodes often have no network access, and the pathology models are gated (UNI, CONCH) or
fetched from GitHub (kaiko.ai). As in TRIDENT's `local_ckpts.json`, a YAML *weights file* maps model
names to local checkpoints once per site (`configs/weights.example.yaml`):

    uni: /models/uni/pytorch_model.bin          # absolute, or relative to the weights file
    kaiko-vits16: /models/kaiko/vits16.pth
    conch: hf-hub:MahmoodLab/conch              # a hub ID is allowed too

Resolution order for a model name:
  1. the explicit setting (`model.weights` / `pairing.checkpoint`): a path, a hub ID or `random`;
  2. the weights file named by `model.weights_file`, else `$CLIPIT_WEIGHTS`;
  3. the registry's hub ID, unless hub access is off (`CLIPIT_OFFLINE=1`); torch.hub IDs (which run the
     repository's code) also need `CLIPIT_TRUST_HUB=1`;
  4. random initialisation, only for models that have no pretrained weights (demo and `-tiny` test
     variants).
Anything else is one error that names the weights file (or the setting) to edit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from clipit.config import ConfigError

ENV_WEIGHTS = "CLIPIT_WEIGHTS"
ENV_OFFLINE = "CLIPIT_OFFLINE"
ENV_TRUST_HUB = "CLIPIT_TRUST_HUB"  # 1: allow torch.hub, which runs the repository's own code on this machine
RANDOM = "random"  # model.weights: random -> random initialisation on purpose (tests, benchmarks)
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "torch.hub:", "timm:")
EXAMPLE = "configs/weights.example.yaml"


class WeightsError(ConfigError):
    """Weights for a model cannot be found or fetched; the message names what to edit."""


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "file" | "hub" | "random"
    location: str | None  # a local path or a hub ID; None for random
    origin: str  # where the choice came from, for messages and `clipit doctor`

    def __str__(self) -> str:
        return f"{self.location or 'random init'} ({self.origin})"

    @property
    def stored(self) -> str | None:
        """What a resolved config records in model.weights: a path, a hub ID, `random`."""
        return self.location if self.kind != "random" else RANDOM


def is_hub_id(value: str) -> bool:
    return str(value).startswith(HUB_PREFIXES)


def offline() -> bool:
    """Hub access is off when CLIPIT_OFFLINE is set (1/true/yes). HF_HUB_OFFLINE alone still lets
    huggingface_hub read its local cache, so it does not turn the hub path off."""
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def trust_hub() -> bool:
    """torch.hub entries (kaiko.ai) run the repository's hubconf.py; only with CLIPIT_TRUST_HUB=1."""
    return os.environ.get(ENV_TRUST_HUB, "").strip().lower() in ("1", "true", "yes", "on")


def untrusted_hub(name: str, hub_id: str, weights_file: str | Path | None = None) -> WeightsError:
    """The one-line refusal of a torch.hub fetch without the opt-in."""
    return WeightsError(
        f"{name!r} comes from torch.hub ({hub_id}), which runs that repository's code on this machine; "
        f"set {ENV_TRUST_HUB}=1 if you trust it, or {_hint(name, weights_file_path(weights_file))}"
    )


def weights_file_path(configured: str | Path | None) -> Path | None:
    value = configured or os.environ.get(ENV_WEIGHTS)
    return Path(value).expanduser() if value else None


def _origin_of_file(configured: str | Path | None) -> str:
    return "model.weights_file" if configured else f"${ENV_WEIGHTS}"


def read_weights_file(path: Path, configured: str | Path | None = None) -> dict[str, str]:
    """name -> path or hub ID; relative paths are taken relative to the weights file."""
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file not found (set by {_origin_of_file(configured)}); "
            f"copy {EXAMPLE} there and fill in your checkpoint paths"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise WeightsError(f"{path}: weights file is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise WeightsError(f"{path}: a weights file maps model names to paths or hub IDs (name: /path/to/ckpt)")
    out = {}
    for name, value in raw.items():
        if value == RANDOM or is_hub_id(value):
            out[str(name)] = value
        else:
            p = Path(value).expanduser()
            out[str(name)] = str(p if p.is_absolute() else (path.parent / p).resolve())
    return out


def _hint(name: str, file: Path | None) -> str:
    if file is not None:
        return f"add `{name}: /path/to/checkpoint` to the weights file {file}"
    return (
        f"set model.weights, or list `{name}: /path/to/checkpoint` in a weights file "
        f"(model.weights_file or ${ENV_WEIGHTS}; see {EXAMPLE})"
    )


def resolve(
    name: str,
    explicit: str | Path | None = None,
    weights_file: str | Path | None = None,
    hub_id: str | None = None,
    random_ok: bool = False,
    setting: str = "model.weights",
) -> WeightsSource:
    """Pick the weights for model `name` (see the module docstring for the order)."""
    file = weights_file_path(weights_file)
    if explicit is not None:
        value = str(explicit)
        if value == RANDOM:
            return WeightsSource("random", None, setting)
        if is_hub_id(value):
            return _hub(name, value, setting, file)
        path = Path(value).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: checkpoint for {name!r} not found; fix {setting}")
        return WeightsSource("file", str(path), setting)
    if file is not None:
        entries = read_weights_file(file, weights_file)
        if name in entries:
            value = entries[name]
            origin = f"weights file {file}"
            if value == RANDOM:
                return WeightsSource("random", None, origin)
            if is_hub_id(value):
                return _hub(name, value, origin, file)
            if not Path(value).is_file():
                raise WeightsError(
                    f"{value}: checkpoint for {name!r} not found; fix its line in the weights file {file}"
                )
            return WeightsSource("file", value, origin)
    if hub_id is not None and not offline():
        return WeightsSource("hub", hub_id, "registry default")
    if random_ok:
        return WeightsSource("random", None, "no pretrained weights exist for this model")
    why = f"hub download is off ({ENV_OFFLINE}=1)" if hub_id is not None else "it has no hub default"
    raise WeightsError(f"no weights for {name!r}: not set and {why}; {_hint(name, file)}")


def _hub(name: str, hub_id: str, origin: str, file: Path | None) -> WeightsSource:
    if offline():
        raise WeightsError(
            f"{name!r} points at the hub ({hub_id}, from {origin}) but hub download is off "
            f"({ENV_OFFLINE}=1); {_hint(name, file)}"
        )
    return WeightsSource("hub", hub_id, origin)


def hub_failure(name: str, hub_id: str, err: BaseException, weights_file: str | Path | None = None) -> WeightsError:
    """The one-line error for a hub fetch that failed (no network, gated repo, no token)."""
    detail = " ".join(str(err).split())[:200] or type(err).__name__
    return WeightsError(
        f"could not fetch {name!r} from {hub_id} ({type(err).__name__}: {detail}); on a machine "
        f"with network access download it, then {_hint(name, weights_file_path(weights_file))}"
    )


def resolve_pairing_checkpoint(
    model: str, checkpoint: str | Path | None, weights_file: str | Path | None = None
) -> str | None:
    """pairing.checkpoint if set (a file, a folder or a hub ID: the pairing loader checks it), else the
    weights file's entry for the pairing model's name (e.g. `conch:`), else None."""
    if checkpoint:
        return str(checkpoint)
    file = weights_file_path(weights_file)
    if file is not None:
        return read_weights_file(file, weights_file).get(model)
    return None
