"""A cluster profile (or a grid's resources) with zero or negative nodes, GPUs, CPUs or memory is refused at
load with one line naming the file and the key, before a cost is priced or a job submitted."""

import pytest

from clipit.config import ConfigError
from clipit.hpc.cluster import load_profile


@pytest.mark.parametrize(
    ("key", "value"),
    [("nodes", 0), ("gpus_per_node", -1), ("cpus_per_task", 0), ("mem_gb", 0), ("tasks_per_node", -2)],
)
def test_impossible_resources_are_refused_naming_the_key(tmp_path, key, value):
    profile = tmp_path / "site.yaml"
    profile.write_text(f"executor: slurm\n{key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_profile(str(profile))
    assert str(err.value).startswith(str(profile)) and key in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=key):  # the same through a grid's resources
        load_profile("local-cluster", {key: value})


def test_a_sane_profile_loads(tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("nodes: 2\ngpus_per_node: 4\ncpus_per_task: 8\nmem_gb: 64\n")
    loaded = load_profile(str(profile))
    assert (loaded.nodes, loaded.gpus_per_node, loaded.cpus_per_task, loaded.mem_gb) == (2, 4, 8, 64.0)
