"""Count the collected tests that start real processes of the kinds issue 18 protects: torchrun,
`accelerate launch`, SLURM jobs, kill -9 (SIGKILL), a TensorBoard server, a frozen process (SIGSTOP),
a lock held by another process; and, reported apart, tests that start `python -m clipit` themselves
(or through a fixture of their module).

Usage: python .ci/count_process_tests.py [REPO]   (default: this repository; every tier: -m '')
A test counts when its own source, or a fixture or module-level helper it uses (transitively, its
module and the conftest.py files above it), names one of those. Prints one line per kind and test.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

KINDS = {
    "torchrun": re.compile(r"torchrun", re.IGNORECASE),
    "accelerate launch": re.compile(r"accelerate[\"'/].*launch|\"launch\""),
    "slurm": re.compile(r"\[\s*\"(sbatch|srun|scontrol|squeue|scancel)\"|mark\.slurm|pytestmark = .*slurm|\.sbatch\b"),
    "kill -9": re.compile(r"SIGKILL|kill -9"),
    "sigstop": re.compile(r"SIGSTOP|start_frozen_after"),
    "tensorboard server": re.compile(r"TENSORBOARD|\"tensorboard\""),
    "lock held by another process": re.compile(r"\bHOLD\b|def hold\("),
}
OTHER = {"python -m clipit": re.compile(r"run_clipit\(|\"-m\", \"clipit\"")}  # reported, not protected


def module_defs(path: Path) -> tuple[dict[str, str], str]:
    tree = ast.parse(path.read_text())
    src = path.read_text()
    defs = {n.name: ast.get_source_segment(src, n) for n in tree.body if isinstance(n, ast.FunctionDef)}
    top = "\n".join(ast.get_source_segment(src, n) for n in tree.body if not isinstance(n, ast.FunctionDef))
    return defs, top


def closure(name: str, scopes: list[dict[str, str]]) -> str:
    seen, todo, text = set(), [name], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for scope in scopes:
            if n in scope:
                text.append(scope[n])
                todo += re.findall(r"[A-Za-z_]\w*", scope[n])
                break
    return "\n".join(text)


def main(repo: Path) -> None:
    ids = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p", "no:cacheprovider"],
        cwd=repo,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    ids = [i for i in ids if "::" in i]
    counts: dict[str, int] = {}
    hits = 0
    for node in ids:
        file, func = node.split("::")[0], node.split("::")[-1].split("[")[0]
        path = repo / file
        defs, top = module_defs(path)
        scopes = [defs]
        for parent in [path.parent, *path.parents]:
            if parent == repo.parent:
                break
            if (parent / "conftest.py").exists():
                scopes.append(module_defs(parent / "conftest.py")[0])
        text = closure(func, scopes) + "\n" + "\n".join(line for line in top.splitlines() if "pytestmark" in line)
        # parametrized ids that carry a kind (e.g. [sigkill]) count only for that parameter
        kinds = [k for k, rx in KINDS.items() if rx.search(text)]
        own = closure(func, [defs])  # session fixtures start their process once: not counted per test
        for k, rx in OTHER.items():
            counts[k] = counts.get(k, 0) + bool(rx.search(own))
        if kinds:
            hits += 1
            print(f"{node}: {', '.join(kinds)}")
            for k in kinds:
                counts[k] = counts.get(k, 0) + 1
    print(f"collected {len(ids)}; tests starting such a process: {hits}; by kind: {counts}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve())
