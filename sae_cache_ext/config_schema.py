"""The config's fields, read from source without importing it: `config_fields`.

`CacheActivationsRunnerConfig` subclasses sae-lens's config, and importing either
imports torch and sae-lens (seconds). The command line only needs each field's name,
type, default and meaning to check a config file, so this module reads them from the
two source files with `ast`: sae-lens's `config.py` (found with
`importlib.util.find_spec`, nothing executed; meanings from the class docstring's
`Args:` lines) and ours (meanings from the docstring under each field). A test holds
the result against `dataclasses.fields` and `typing.get_type_hints` of the real class,
so the two never drift apart. Standard library only.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CLASS_NAME = "CacheActivationsRunnerConfig"
UPSTREAM = "sae-lens"
OURS = "sae-cache-ext"


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""The default of a required field."""

COMPUTED: Any = type("_Computed", (), {"__repr__": lambda self: "COMPUTED"})()
"""The default of a field whose default is computed at import (e.g. `device`)."""


@dataclass(frozen=True)
class FieldSpec:
    """One config field, as its source declares it."""

    name: str
    annotation: str  # as written, e.g. "int | None"
    type: Any  # the annotation evaluated (typing objects; `Any` where unknown)
    default: Any  # MISSING (required), COMPUTED, or the default value
    default_text: str  # the default as written in the source
    doc: str  # one paragraph, whitespace collapsed
    origin: str  # UPSTREAM or OURS

    @property
    def required(self) -> bool:
        return self.default is MISSING


def _upstream_source() -> Path:
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("sae-lens is not installed: pip install sae-lens")
    return Path(next(iter(spec.submodule_search_locations))) / "config.py"


def _find_class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} not found")


def _args_docs(docstring: str | None) -> dict[str, str]:
    """`name (type): meaning` lines of a Google-style `Args:` section."""
    docs: dict[str, str] = {}
    for line in (docstring or "").splitlines():
        match = re.match(r"\s*(\w+)\s*\([^)]*\):\s*(.+)", line)
        if match:
            docs[match.group(1)] = match.group(2).strip()
    return docs


def _namespace(tree: ast.Module) -> dict[str, Any]:
    """Names an annotation may use: builtins, `Literal`, `Any`, and the module's
    own type aliases (`X = int | Literal[...] | None`)."""
    names: dict[str, Any] = {**vars(builtins), "Literal": Literal, "Any": Any}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id[:1].isupper()
        ):
            try:
                names[node.targets[0].id] = eval(
                    compile(ast.Expression(node.value), "<alias>", "eval"), names
                )
            except Exception:  # not a type alias
                continue
    return names


def _evaluate(annotation: str, names: dict[str, Any]) -> Any:
    try:
        return eval(annotation, dict(names))
    except Exception:
        return Any


def _default(node: ast.expr | None) -> tuple[Any, str]:
    if node is None:
        return MISSING, ""
    text = ast.unparse(node)
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "field"
        and node.keywords
    ):
        for keyword in node.keywords:
            if keyword.arg == "default_factory":
                factory = ast.unparse(keyword.value)
                if factory in ("dict", "list"):
                    return {"dict": {}, "list": []}[factory], f"{factory}()"
            if keyword.arg == "default":
                return _default(keyword.value)
        return COMPUTED, text
    try:
        return ast.literal_eval(node), text
    except ValueError:
        return COMPUTED, text


def _fields_of(path: Path, origin: str) -> list[FieldSpec]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = _find_class(tree, CLASS_NAME)
    names = _namespace(tree)
    class_docs = _args_docs(ast.get_docstring(cls))
    specs = []
    body = cls.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        doc = class_docs.get(name, "")
        after = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            doc = after.value.value
        annotation = ast.unparse(node.annotation)
        default, default_text = _default(node.value)
        specs.append(
            FieldSpec(
                name=name,
                annotation=annotation,
                type=_evaluate(annotation, names),
                default=default,
                default_text=default_text,
                doc=" ".join(doc.split()),
                origin=origin,
            )
        )
    return specs


@functools.cache
def config_fields() -> tuple[FieldSpec, ...]:
    """Every field of our `CacheActivationsRunnerConfig`, in the dataclass's order
    (sae-lens's fields, then ours)."""
    ours = Path(__file__).with_name("config.py")
    return (*_fields_of(_upstream_source(), UPSTREAM), *_fields_of(ours, OURS))


def fields_by_name() -> dict[str, FieldSpec]:
    return {spec.name: spec for spec in config_fields()}
