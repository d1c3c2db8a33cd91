"""The house rules of docs/architecture.md: imports go downwards only, and every module is in the table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "d2merge"

# What each layer may import from d2merge (function-level imports count too: a lazy import
# upwards is still an upward import).
ALLOWED = {
    "d2merge.errors": (),
    "d2merge.dtypes": (),
    "d2merge.sizes": ("d2merge.errors",),
    "d2merge.profile": (),
    "d2merge.device": ("d2merge.errors",),
    "d2merge.io.direct_io": ("d2merge.profile",),
    "d2merge.io.tensor_reader": ("d2merge.errors", "d2merge.io", "d2merge.profile"),
    "d2merge.methods": ("d2merge.errors", "d2merge.methods"),
    "d2merge.options": ("d2merge.errors", "d2merge.dtypes"),
    "d2merge.verify_options": ("d2merge.errors",),
    "d2merge.io.json_file": ("d2merge.errors",),
    "d2merge.io.safetensors_file": ("d2merge.errors", "d2merge.io.direct_io", "d2merge.io.json_file"),
    "d2merge.io.checkpoint": ("d2merge.errors", "d2merge.io"),
    "d2merge.io.adapter": ("d2merge.errors", "d2merge.io", "d2merge.methods"),
    "d2merge.io.output": ("d2merge.errors", "d2merge.io.json_file"),
    "d2merge.io.source_hashes": ("d2merge.errors", "d2merge.io", "d2merge.profile"),
    "d2merge.plan": ("d2merge.errors", "d2merge.dtypes", "d2merge.sizes", "d2merge.options", "d2merge.io",
                     "d2merge.methods"),
    "d2merge.engine": ("d2merge.errors", "d2merge.device", "d2merge.profile", "d2merge.io", "d2merge.methods",
                       "d2merge.plan"),
    "d2merge.export.model_card": ("d2merge",),
    "d2merge.export.hf_folder": ("d2merge.errors", "d2merge.device", "d2merge.io", "d2merge.plan", "d2merge.engine",
                                 "d2merge.export.model_card"),
    # verify: pure records and arithmetic at the bottom, the one column code path above them,
    # the thin orchestration (the package itself) on top.
    "d2merge.verify.stats": (),
    "d2merge.verify.results": ("d2merge.verify_options",),
    "d2merge.verify.probes": ("d2merge.errors", "d2merge.io", "d2merge.tasks"),
    "d2merge.verify.limits": ("d2merge.errors", "d2merge.dtypes", "d2merge.verify_options", "d2merge.verify.probes",
                              "d2merge.verify.results", "d2merge.verify.stats"),
    "d2merge.forward": (),
    "d2merge.verify.streamed": ("d2merge.device", "d2merge.forward", "d2merge.io", "d2merge.runtime",
                                "d2merge.verify.limits"),
    "d2merge.verify.compare": ("d2merge.forward", "d2merge.tasks", "d2merge.verify.probes", "d2merge.verify.results",
                               "d2merge.verify.stats"),
    "d2merge.verify.weights": ("d2merge.errors", "d2merge.io", "d2merge.plan", "d2merge.engine",
                               "d2merge.verify.limits", "d2merge.verify.results"),
    "d2merge.verify.report": ("d2merge", "d2merge.io.output", "d2merge.verify_options", "d2merge.verify.results"),
    "d2merge.verify.columns": ("d2merge.forward", "d2merge.io", "d2merge.plan", "d2merge.tasks", "d2merge.runtime",
                               "d2merge.export.gguf", "d2merge.export.onnx_genai", "d2merge.verify_options",
                               "d2merge.verify.compare", "d2merge.verify.limits", "d2merge.verify.probes",
                               "d2merge.verify.results", "d2merge.verify.streamed", "d2merge.verify.weights"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def d2merge_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "d2merge":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "d2merge")
    return found


def rule_for(name: str) -> tuple[str, ...] | None:
    """The rule of the most specific layer ``name`` belongs to; None above the layered part."""
    matches = [key for key in ALLOWED if name == key or name.startswith(key + ".")]
    return ALLOWED[max(matches, key=len)] if matches else None


def within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


LAYERED = [p for p in sorted(PACKAGE.rglob("*.py")) if rule_for(module_name(p)) is not None]


@pytest.mark.parametrize("path", LAYERED, ids=module_name)
def test_imports_go_downwards_only(path: Path):
    name = module_name(path)
    allowed = rule_for(name)
    assert allowed is not None
    upward = sorted(m for m in d2merge_imports(path) if not within(m, allowed + (name,)))
    assert not upward, f"{name} imports upwards: {', '.join(upward)}"


def test_the_engine_knows_nothing_of_exporters():
    imports = d2merge_imports(PACKAGE / "engine.py")
    assert not any(m.startswith("d2merge.export") or m == "d2merge.merge" for m in imports)


def test_every_module_is_in_the_architecture_table():
    table = (ROOT / "docs" / "architecture.md").read_text()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent.name != "methods":
            continue
        rel = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        assert f"`{rel}`" in table or path.name in table or (folder in table and path.parent.name == "methods"), (
            f"docs/architecture.md does not say what {rel} owns")
