"""A non-editable install carries what clipit reads at run time: cluster profiles, the demo CLIP config,
the report's reference numbers and the `python -m clipit` entry point."""

import shutil
import subprocess
import sys
import zipfile

from clipit.hpc.cluster import PROFILE_DIR
from clipit.results.references import SHIPPED
from clipit_testing import ROOT


def test_wheel_ships_profiles_and_package_data(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "clipit", src / "clipit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("clipit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"clipit/hpc/profiles/{p.name}" for p in PROFILE_DIR.glob("*.yaml")}
    assert shipped and shipped <= names
    assert {"clipit/pairing/clipit-demo-clip.json", "clipit/__main__.py"} <= names
    references = {f"clipit/results/reference_data/{name}" for name in SHIPPED}  # `clipit report`'s published numbers
    assert references <= names
