"""The import graph of clipit/ (module-level and function-local imports alike) has no cycle, and no
import points up a layer: data flows reports -> pairing -> shards -> training -> evaluation ->
results, with the HPC layer and the command line on top (docs/architecture.md). An import under
`if TYPE_CHECKING:` (annotations only) counts for the layers but never runs, so it cannot close a cycle."""

import ast
from pathlib import Path

import pytest

from clipit_testing import ROOT

PACKAGE = ROOT / "clipit"
# Bottom to top. A module may import modules of its own layer or of a layer below it, never above.
LAYERS = [
    (
        "base",
        [
            "clipit",
            "clipit.errors",
            "clipit.identity",
            "clipit.io",
            "clipit.layout",
            "clipit.typed_yaml",
            "clipit.methods",
            "clipit.config_checks",
            "clipit.config",
            "clipit.weights",
            "clipit.metrics",
            "clipit.state_dict",
            "clipit.config_reference",
            "clipit.locks",
            "clipit.progress",
            "clipit.provenance",
        ],
    ),
    ("data", ["clipit.data"]),
    (
        "corpus",
        [
            "clipit.corpus",
            "clipit.corpus_formats",
            "clipit.corpus_reader",
            "clipit.corpus_passages",
            "clipit.corpus_join",
        ],
    ),
    ("pairing", ["clipit.pairing"]),
    ("shards", ["clipit.shards"]),
    ("models", ["clipit.models"]),
    ("training", ["clipit.training"]),
    ("evaluation", ["clipit.evaluation"]),
    ("results", ["clipit.results"]),
    ("stages", ["clipit.demo_inputs", "clipit.pipeline", "clipit.doctor", "clipit.cells", "clipit.reruns"]),
    ("hpc", ["clipit.hpc"]),
    (
        "cli",
        ["clipit.cli", "clipit.cli_flags", "clipit.cli_data", "clipit.cli_runs", "clipit.cli_hpc", "clipit.__main__"],
    ),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def typing_only_imports(tree: ast.AST) -> set[ast.AST]:
    """The import statements inside `if TYPE_CHECKING:` blocks (read by type checkers, never run)."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test).endswith("TYPE_CHECKING")]
    return {n for block in blocks for statement in block.body for n in ast.walk(statement)}


def imports_of(path: Path, typing_only: bool = True) -> set[str]:
    """Every clipit module `path` imports, wherever the import statement sits (functions included);
    typing_only=False leaves out the imports under `if TYPE_CHECKING:`."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if typing_only else typing_only_imports(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "clipit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != "clipit":
                continue
            for alias in node.names:  # `from clipit.x import y` imports the module clipit.x.y when there is one
                found.add(f"{source}.{alias.name}" if is_module(f"{source}.{alias.name}") else source)
    found.discard(here)
    return found


def layer_of(name: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len and prefix != "clipit":
                best, best_len = i, len(prefix)
    if best is None and name == "clipit":
        return 0
    if best is None:
        raise AssertionError(
            f"{name} belongs to no layer: add it to LAYERS in tests/test_architecture.py and to docs/architecture.md"
        )
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.fixture(scope="module")
def runtime_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p, typing_only=False) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_import_points_up_a_layer(graph):
    upward = [
        f"{src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
        for src, targets in graph.items()
        for dst in sorted(targets)
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(runtime_graph):
    graph = runtime_graph
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(nxt) :] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_function_local_imports(tmp_path):
    """The checker itself: an import inside a function body counts like one at the top."""
    graph = {module_name(p): imports_of(p) for p in [PACKAGE / "pipeline.py"]}
    assert "clipit.training.trainer" in graph["clipit.pipeline"]  # imported inside train_and_evaluate


def test_the_graph_tells_typing_only_imports_apart():
    """clipit.config_checks names the config dataclasses in annotations only: a layer edge, not a runtime one."""
    checks = PACKAGE / "config_checks.py"
    assert "clipit.config" in imports_of(checks)
    assert "clipit.config" not in imports_of(checks, typing_only=False)
    assert "clipit.errors" in imports_of(checks, typing_only=False)


def test_run_layout_is_spelled_out_in_one_module():
    """`runs/<method>/seed-<n>` and the run's file names live in clipit/layout.py only."""
    spellings = [
        '"seed-',
        "'seed-",
        'f"seed-',
        '"train_summary.json"',
        '"metrics.json"',
        '"state.json"',
        '"config.yaml"',
        '/ "runs"',
        "parent.parent",
    ]
    offenders = [
        f"{p.relative_to(ROOT)}: {s}"
        for p in PACKAGE.rglob("*.py")
        if p.name != "layout.py"
        for s in spellings
        if s in p.read_text()
    ]
    assert not offenders, offenders


def test_cli_catches_one_error_base_class():
    """cli.py turns a ClipitError into one line; its command modules catch nothing (an error they caught
    would skip that contract)."""
    caught = {}
    for path in sorted(PACKAGE.glob("cli*.py")):
        handlers = [h for h in ast.walk(ast.parse(path.read_text())) if isinstance(h, ast.ExceptHandler)]
        caught[path.name] = [ast.unparse(h.type) for h in handlers]
    assert caught.pop("cli.py") == ["ClipitError"]
    assert caught and all(not handlers for handlers in caught.values()), caught


def test_no_code_from_data():
    """No pickle anywhere in clipit, every torch.load is weights_only=True, every YAML read is safe_load."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for bad in ("weights_only=False", "pickle", "yaml.load(", "yaml.unsafe_load"):
            if bad in text:
                offenders.append(f"{path.relative_to(ROOT)}: {bad}")
        for call in ast.walk(ast.parse(text)):
            if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.load":
                if not any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in call.keywords):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders
