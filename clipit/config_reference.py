"""docs/config.md, generated from the config dataclasses: every key, its type, default and comment.

The comments are the ones written next to each field in clipit/config.py, read from its source, so
the reference cannot drift from the code (tests/test_config.py checks the file is current).

    python -m clipit.config_reference > docs/config.md
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import types
import typing
from pathlib import Path

from clipit import config as config_module
from clipit.config import ExperimentConfig
from clipit.config_checks import PATH_KEYS
from clipit.typed_yaml import Range, rules_of

SOURCE = Path(config_module.__file__)


def field_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comments on the field's lines (a field the formatter split over several
    lines keeps its comment on the last one) or the comment lines just above it."""
    text = SOURCE.read_text()
    lines = text.splitlines()
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    by_line = {t.start[0]: t.string.lstrip("# ").strip() for t in tokens if t.type == tokenize.COMMENT}
    comments: dict[tuple[str, str], str] = {}
    for cls in ast.parse(text).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, number = [], node.lineno - 1
            while number >= 1 and lines[number - 1].strip().startswith("#"):
                above.insert(0, by_line.get(number, ""))
                number -= 1
            own = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
            comments[(cls.name, node.target.id)] = " ".join(above + own)
    return comments


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if type(None) in args:  # optional: say "or null" instead of a union
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + " or null"
    if args:
        return str(tp).replace("typing.", "").replace(" | ", " or ")  # a | would split the table cell
    return getattr(tp, "__name__", str(tp))


def _valid(tp) -> str:
    """The valid range the loader checks (Range/Items in the field's type), as the reference shows it."""
    rules = [r.text() for r in rules_of(tp)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # optional: the rules of the non-null type
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, dict) and args:
        inner = [r.text() for r in rules_of(args[-1]) if isinstance(r, Range)]
        rules += [f"each {r}" for r in inner]
    return ", ".join(r for r in rules if r)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "(section)" if dataclasses.is_dataclass(value) else repr(value)
    return "required"


def reference() -> str:
    comments = field_comments()
    out = [
        "# Config reference",
        "",
        "Generated from `clipit/config.py` by `python -m clipit.config_reference > docs/config.md`; do not",
        "edit by hand. Every experiment config (`configs/*.yaml`) is a mapping of these sections. Unknown",
        "keys, wrong types and out-of-range values are errors naming the key; `--set KEY=VALUE` overrides",
        "any key (the value is read as YAML); `--print-config` prints the resolved config and exits.",
        "",
        "**Paths** (one rule): a relative path is relative to the working directory of the command (the",
        "repository root in the shipped configs), never to the config file. In the path keys",
        "(" + ", ".join(f"`{k}`" for k in PATH_KEYS) + ")",
        "`${VAR}` is replaced by the environment variable VAR (unset: an error naming the key),",
        "`${CONFIG_DIR}` by the config file's folder, and a leading `~` by the home folder; e.g.",
        "`data.root: ${SCRATCH}/pcam`. Grid files expand `root` and `base` the same way; the config files a",
        "grid names (`base`, an axis value's `config`, a `profile` given as a path) are relative to the grid",
        "file's folder, so a grid works from any working directory (`base: base/paper.yaml`).",
        "Paths left empty are derived from `output_dir` (`pairing.dir`, `shards.dir`, the demo's data).",
        "The `valid` column is what the loader checks; a float is also finite (never NaN or inf) and may be",
        "written `1e-3` (YAML 1.1 reads that as text, which a float key accepts when it reads as a number).",
        "",
    ]

    def section(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        extras = typing.get_type_hints(cls, include_extras=True)
        rows, nested = [], []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{key}."))
                continue
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
                nested.append((typing.get_args(tp)[1], f"{key}.<name>."))
                rows.append(
                    f"| `{key}` | mapping of name -> {typing.get_args(tp)[1].__name__} | {_default(f)} | | "
                    f"{comments.get((cls.__name__, f.name), '')} |"
                )
                continue
            doc = comments.get((cls.__name__, f.name), "").replace("|", "\\|")
            default = _default(f).replace("'", "`").replace("None", "null")
            rows.append(f"| `{key}` | {_type_name(tp)} | {default} | {_valid(extras[f.name])} | {doc} |")
        title = prefix.rstrip(".") or "top level"
        doc = " ".join((cls.__doc__ or "").split()) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__) else ""
        out.extend([f"## `{title}`", ""] + ([doc, ""] if doc else []))
        if rows:
            out.extend(["| key | type | default | valid | meaning |", "|---|---|---|---|---|", *rows, ""])
        for tp, p in nested:
            section(tp, p)

    section(ExperimentConfig, "")
    return "\n".join(out)


if __name__ == "__main__":
    print(reference())
