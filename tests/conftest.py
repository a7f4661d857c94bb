import pytest

from clipit_testing import TINY, cli


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Shards of the tiny demo (built once per session); returns overrides that point a run at them."""
    base = tmp_path_factory.mktemp("tiny")
    proc = cli("shard", "build", "--config", TINY, "--set", f"output_dir={base}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [
        f"shards.dir={base / 'shards'}",
        f"pairing.dir={base / 'pairing'}",
        f"data.root={base / 'data' / 'images'}",
        f"reports.path={base / 'data' / 'reports.jsonl'}",
        f"pairing.checkpoint={base / 'demo-clip' / 'model.safetensors'}",
    ]
