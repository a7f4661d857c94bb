"""The training state's DeepSpeed module load (clipit/training/state.py::load_trainable): DeepSpeed saves
the module without its frozen parameters, so the load is partial by design; every trainable tensor must be
in the saved state and nothing foreign, else a resume would silently keep a tensor at its initial value.
The ZeRO-2 resume end to end is tests/faults/test_resume_faults.py."""

from pathlib import Path

import pytest
import torch

from clipit.training.state import load_trainable
from clipit.training.state_files import BadStateFile

WHERE = Path("run/checkpoints/latest/deepspeed")


def model() -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    module[0].requires_grad_(False)  # the frozen backbone: not in the saved state
    return module


def test_the_trainable_tensors_are_loaded_and_the_frozen_ones_kept():
    source, target = model(), model()
    frozen_before = target[0].weight.clone()
    saved = {k: v for k, v in source.state_dict().items() if not k.startswith("0.")}  # as DeepSpeed saves it
    load_trainable(saved, target, WHERE)
    assert torch.equal(target[2].weight, source[2].weight) and torch.equal(target[1].running_var, source[1].running_var)
    assert torch.equal(target[0].weight, frozen_before)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda s: s.pop("2.weight"), "1 missing, e.g. ['2.weight']"),
        (lambda s: s.update({"3.weight": torch.zeros(1)}), "1 foreign tensors, e.g. ['3.weight']"),
    ],
)
def test_a_state_that_does_not_fit_is_refused(change, needle):
    saved = {k: v for k, v in model().state_dict().items() if not k.startswith("0.")}
    change(saved)
    target = model()
    before = target[2].bias.clone()
    with pytest.raises(BadStateFile) as err:
        load_trainable(saved, target, WHERE)
    assert str(err.value).startswith(f"{WHERE}: does not fit this model") and needle in str(err.value)
    assert torch.equal(target[2].bias, before)  # nothing loaded
