"""The house rules of docs/architecture.md: no import cycle, imports go downwards only, every module in the table.

Every ``import`` statement of every module under ``d2merge/`` counts: module-level, inside a
function (a lazy import is still an arrow between two modules) and under ``if TYPE_CHECKING:``
(a reader sees that arrow too). ``from package import name`` counts as an import of the submodule
``package.name`` when there is one, else of the package itself (its ``__init__.py``).
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

from helpers import REPO_ROOT, run_python

ROOT = REPO_ROOT
PACKAGE = ROOT / "d2merge"

# What each layer may import from d2merge. The rule of a module is that of the longest key it is or
# lies under; a module under no key (the CLI, publish, bench, demo, ...) sits on top and may import
# anything that does not import it back (test_no_import_cycle). "d2merge" alone means the package's
# face (d2merge/__init__.py), whose lazy names reach up to d2merge.api: no layer below imports it.
ALLOWED = {
    "d2merge.version": (),
    "d2merge.errors": (),
    "d2merge.lazy_names": (),
    "d2merge.dtypes": (),
    "d2merge.sizes": ("d2merge.errors",),
    "d2merge.profile": (),
    "d2merge.device": ("d2merge.errors", "d2merge.options"),
    "d2merge.natural_sort": (),
    # the one logit comparator: verify's columns and the exporters' own checks (ONNX, genai) share it.
    "d2merge.logit_comparison": (),
    "d2merge.console": (),
    "d2merge.output_names": ("d2merge.errors", "d2merge.io.output"),
    "d2merge.io.direct_io": ("d2merge.profile",),
    "d2merge.io.tensor_reader": ("d2merge.errors", "d2merge.io", "d2merge.profile"),
    # the option models: torch-free, below everything that takes options (the CLI's flags come from them).
    "d2merge.options": ("d2merge.errors", "d2merge.sizes", "d2merge.dtypes", "d2merge.version", "d2merge.options"),
    # io reads and writes files: it knows the methods' adapter configs, and nothing of the runtime,
    # the plan, the engine, the formats or verify.
    "d2merge.io": ("d2merge.errors", "d2merge.lazy_names", "d2merge.profile", "d2merge.methods", "d2merge.io"),
    "d2merge.io.json_file": ("d2merge.errors",),
    "d2merge.io.safetensors_file": ("d2merge.errors", "d2merge.io.direct_io", "d2merge.io.json_file"),
    "d2merge.io.checkpoint": ("d2merge.errors", "d2merge.io"),
    "d2merge.io.adapter": ("d2merge.errors", "d2merge.io", "d2merge.methods"),
    "d2merge.io.output": ("d2merge.errors", "d2merge.io.json_file", "d2merge.io.safetensors_file"),
    "d2merge.io.source_hashes": ("d2merge.errors", "d2merge.io", "d2merge.profile"),
    # the plan reads headers and configs (io), asks the methods, takes the options; it never sees the engine,
    # a format, adapter_ops (a mix plans itself through planning.model's protocols) or the API's face.
    "d2merge.planning": ("d2merge.errors", "d2merge.dtypes", "d2merge.sizes", "d2merge.options", "d2merge.io",
                         "d2merge.methods", "d2merge.natural_sort", "d2merge.planning"),
    # inside it: the records and the lookups at the bottom, build_plan (planning.build) and the face on top.
    "d2merge.planning.model": ("d2merge.errors", "d2merge.dtypes", "d2merge.sizes", "d2merge.options", "d2merge.io",
                               "d2merge.methods", "d2merge.natural_sort"),
    "d2merge.planning.base_names": ("d2merge.errors", "d2merge.io"),
    "d2merge.planning.ties": ("d2merge.errors", "d2merge.io", "d2merge.methods", "d2merge.options"),
    "d2merge.planning.targets": ("d2merge.errors", "d2merge.io", "d2merge.methods", "d2merge.planning.base_names"),
    "d2merge.planning.shards": ("d2merge.planning.model",),
    "d2merge.planning.mix": ("d2merge.errors", "d2merge.io", "d2merge.sizes", "d2merge.planning.model",
                             "d2merge.planning.shards"),
    "d2merge.engine": ("d2merge.errors", "d2merge.device", "d2merge.profile", "d2merge.io", "d2merge.methods",
                       "d2merge.planning"),
    # the runtime (unmerged adapters inside transformers models) stands beside the plan: io and methods only.
    "d2merge.runtime": ("d2merge.errors", "d2merge.dtypes", "d2merge.io", "d2merge.methods"),
    # inside it: loading below attaching below trainable (fresh adapters reuse attaching's layer helpers)
    "d2merge.runtime.loading": ("d2merge.errors", "d2merge.dtypes", "d2merge.io"),
    "d2merge.runtime.attaching": ("d2merge.errors", "d2merge.io", "d2merge.methods", "d2merge.runtime.loading"),
    "d2merge.runtime.trainable": ("d2merge.errors", "d2merge.io", "d2merge.methods", "d2merge.runtime.attaching"),
    # the formats: below d2merge.api (which imports export.hf_folder), so none imports it back.
    "d2merge.export": ("d2merge.version", "d2merge.errors", "d2merge.dtypes", "d2merge.sizes", "d2merge.profile",
                       "d2merge.console", "d2merge.output_names",
                       "d2merge.device", "d2merge.options", "d2merge.options.verify", "d2merge.io", "d2merge.planning",
                       "d2merge.engine", "d2merge.runtime", "d2merge.logit_comparison", "d2merge.export"),
    # the GGUF package: one module per job, each over those it uses (docs/architecture.md, "The GGUF package").
    # Its face (__init__) names them all, each loaded on first use; d2merge's modules import the module they need.
    "d2merge.export.gguf": ("d2merge.lazy_names", "d2merge.export.gguf"),
    "d2merge.export.gguf.library": ("d2merge.errors",),
    "d2merge.export.gguf.quant": ("d2merge.errors", "d2merge.options", "d2merge.sizes", "d2merge.io.imatrix_file",
                                  "d2merge.io.output"),
    "d2merge.export.gguf.file_types": ("d2merge.errors", "d2merge.options", "d2merge.export.gguf.quant"),
    "d2merge.export.gguf.architectures": ("d2merge.errors", "d2merge.export.gguf.library"),
    "d2merge.export.gguf.tokenizer": ("d2merge.errors", "d2merge.io.json_file", "d2merge.io.transformers_folder",
                                      "d2merge.export.gguf.library"),
    "d2merge.export.gguf.tensors": ("d2merge.errors", "d2merge.export.gguf.library",
                                    "d2merge.export.gguf.architectures", "d2merge.export.gguf.file_types"),
    "d2merge.export.gguf.writer": ("d2merge.version", "d2merge.errors", "d2merge.sizes", "d2merge.console",
                                   "d2merge.output_names", "d2merge.io.json_file", "d2merge.io.output",
                                   "d2merge.export.gguf.library", "d2merge.export.gguf.architectures",
                                   "d2merge.export.gguf.file_types", "d2merge.export.gguf.tensors",
                                   "d2merge.export.gguf.tokenizer"),
    "d2merge.export.gguf.reader": ("d2merge.errors", "d2merge.io.gguf_file", "d2merge.io.transformers_folder",
                                   "d2merge.export.gguf.library"),
    "d2merge.export.gguf.for_verify": ("d2merge.errors", "d2merge.options.verify", "d2merge.export.gguf.library",
                                       "d2merge.export.gguf.reader"),
    # the two writers of a model GGUF: from a merged folder, and from the engine through the one merge pipeline
    "d2merge.export.gguf.folder": ("d2merge.errors", "d2merge.output_names", "d2merge.io",
                                   "d2merge.export.gguf.architectures", "d2merge.export.gguf.file_types",
                                   "d2merge.export.gguf.quant", "d2merge.export.gguf.tensors",
                                   "d2merge.export.gguf.writer"),
    "d2merge.export.gguf.merge": ("d2merge.errors", "d2merge.device", "d2merge.engine", "d2merge.options",
                                  "d2merge.output_names", "d2merge.planning", "d2merge.io", "d2merge.export.hf_folder",
                                  "d2merge.export.pipeline", "d2merge.export.provenance",
                                  "d2merge.export.gguf.architectures", "d2merge.export.gguf.file_types",
                                  "d2merge.export.gguf.quant", "d2merge.export.gguf.tensors",
                                  "d2merge.export.gguf.writer"),
    # llama.cpp's LoRA GGUF is a format fed by an adapter conversion (adapter_ops), not by the engine.
    "d2merge.export.gguf.lora_adapter": ("d2merge.errors", "d2merge.options", "d2merge.io", "d2merge.methods",
                                         "d2merge.adapter_ops", "d2merge.export.gguf.architectures",
                                         "d2merge.export.gguf.library", "d2merge.export.gguf.tensors"),
    # the adapter outputs (convert, combine, extract --to): the PEFT folder writer (adapter_ops), llama.cpp's
    # LoRA GGUF (export.gguf), io for the output checks and the report.
    "d2merge.export.adapter_outputs": ("d2merge.options", "d2merge.adapter_ops", "d2merge.export.gguf.lora_adapter",
                                       "d2merge.io"),
    "d2merge.export.model_card": ("d2merge.version",),
    "d2merge.export.hf_folder": ("d2merge.errors", "d2merge.device", "d2merge.profile", "d2merge.options",
                                 "d2merge.io", "d2merge.planning", "d2merge.engine", "d2merge.export.model_card",
                                 "d2merge.export.pipeline", "d2merge.export.provenance"),
    # the one merge pipeline and the one provenance: under every format writer, over the engine and io.
    "d2merge.export.pipeline": ("d2merge.profile", "d2merge.device", "d2merge.options", "d2merge.io",
                                "d2merge.planning", "d2merge.engine"),
    "d2merge.export.provenance": ("d2merge.version", "d2merge.errors", "d2merge.io", "d2merge.planning",
                                  "d2merge.export.model_card"),
    "d2merge.api": ("d2merge.engine", "d2merge.export.hf_folder", "d2merge.io", "d2merge.options", "d2merge.planning"),
    # verify: pure records and arithmetic at the bottom, the one column code path above them,
    # the thin orchestration (the package itself) on top.
    "d2merge.verify.stats": (),
    "d2merge.verify.results": ("d2merge.options.verify",),
    "d2merge.verify.probes": ("d2merge.errors", "d2merge.io", "d2merge.tasks"),
    "d2merge.verify.limits": ("d2merge.errors", "d2merge.dtypes", "d2merge.options.verify", "d2merge.verify.probes",
                              "d2merge.verify.results", "d2merge.verify.stats"),
    "d2merge.forward": ("d2merge.console",),
    "d2merge.verify.streamed": ("d2merge.console", "d2merge.device", "d2merge.forward", "d2merge.io",
                                "d2merge.runtime", "d2merge.verify.limits"),
    "d2merge.verify.compare": ("d2merge.forward", "d2merge.logit_comparison", "d2merge.tasks", "d2merge.verify.probes",
                               "d2merge.verify.results",
                               "d2merge.verify.stats"),
    "d2merge.verify.weights": ("d2merge.errors", "d2merge.io", "d2merge.planning", "d2merge.engine",
                               "d2merge.verify.limits", "d2merge.verify.results"),
    "d2merge.verify.report": ("d2merge.version", "d2merge.io", "d2merge.export.model_card", "d2merge.options.verify",
                              "d2merge.verify.results"),
    "d2merge.verify.columns": ("d2merge.forward", "d2merge.io", "d2merge.planning", "d2merge.tasks", "d2merge.runtime",
                               "d2merge.export.registry", "d2merge.options.verify",
                               "d2merge.verify.compare", "d2merge.verify.limits", "d2merge.verify.probes",
                               "d2merge.verify.results", "d2merge.verify.streamed", "d2merge.verify.weights"),
    # merge-many: its options stay torch-free (the CLI's flags); the run never imports the CLI or publish.
    "d2merge.many": ("d2merge.errors", "d2merge.sizes", "d2merge.profile", "d2merge.options", "d2merge.io",
                     "d2merge.planning", "d2merge.engine", "d2merge.export", "d2merge.verify", "d2merge.options.verify",
                     "d2merge.reports", "d2merge.many"),
    # the HTML pages: the machinery writes through io.output; a page reads its report's records
    # (verify.report, bench, many.report for type checking only: none of them imports a page back).
    "d2merge.reports.html": ("d2merge.io.output",),
    "d2merge.reports": ("d2merge.reports.html", "d2merge.verify.results", "d2merge.verify.report", "d2merge.bench",
                        "d2merge.many.report"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (they name a type; they never run)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
                                 or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")):
            inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


def imports_of(name: str, *, type_checking: bool = True) -> dict[str, int]:
    """The d2merge modules ``name`` imports, each with the line of its first import (any depth, any branch;
    those under ``if TYPE_CHECKING:`` only with ``type_checking``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = set() if type_checking else _type_checking_blocks(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        targets: list[str] = []
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            if target.split(".")[0] == "d2merge" and target != name:
                found.setdefault(target, node.lineno)
    return found


@lru_cache(maxsize=1)
def import_graph() -> dict[str, dict[str, int]]:
    return {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def every_cycle(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle in each strongly connected part of ``graph`` that has any (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = set()
            while not part or node not in part:
                part.add(stack.pop())
            if len(part) > 1:
                parts.append(part)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    found = [find_cycle({a: {b: n for b, n in graph[a].items() if b in part} for a in part}) for part in parts]
    return sorted(c for c in found if c is not None)


def describe(cycles: list[list[str]], where: dict[str, dict[str, tuple[str, int]]]) -> str:
    text = []
    for cycle in cycles:
        steps = [f"{a} -> {b} ({where[a][b][0]}:{where[a][b][1]})" for a, b in zip(cycle, cycle[1:])]
        text.append("import cycle: " + " -> ".join(cycle) + "\n    " + "\n    ".join(steps))
    return f"{len(cycles)} import cycle(s):\n  " + "\n  ".join(text)


def test_no_import_cycle_between_modules():
    graph = import_graph()
    where = {a: {b: (a, line) for b, line in targets.items()} for a, targets in graph.items()}
    cycles = every_cycle(graph)
    assert not cycles, describe(cycles, where)


def area(name: str) -> str:
    """A package's modules count as the package; its face (``__init__.py``) and top-level modules as themselves.

    Why the face apart: a package's ``__init__`` may orchestrate its modules from above (``d2merge.verify``
    writes its page through ``d2merge.reports``, which reads ``d2merge.verify.report``) without a cycle.
    """
    if MODULES[name].name == "__init__.py":
        return name + ".__init__"
    parts = name.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_between_packages():
    """merge imports export.hf_folder, so no module of export may import merge (and so on for every package).

    Imports that run count here, not those under ``if TYPE_CHECKING:``: the pages of ``d2merge.reports``
    name their report's type (``bench_page`` names ``bench.BenchReport``) while ``verify`` writes its own
    page; the module graph above already holds those type-only arrows to no cycle.
    """
    graph: dict[str, dict[str, int]] = {}
    where: dict[str, dict[str, tuple[str, int]]] = {}
    for a in MODULES:
        for b, line in imports_of(a, type_checking=False).items():
            if area(a) != area(b):
                graph.setdefault(area(a), {})[area(b)] = line
                where.setdefault(area(a), {}).setdefault(area(b), (a, line))
    cycles = every_cycle(graph)
    assert not cycles, describe(cycles, where)


def test_the_cycle_finder_names_every_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4, "e": 5}, "e": {"d": 6}, "f": {"a": 7}}
    assert every_cycle(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert every_cycle({"a": {"b": 1}, "b": {}}) == []


def rule_for(name: str) -> tuple[str, ...] | None:
    """The rule of the most specific layer ``name`` belongs to; None above the layered part."""
    matches = [key for key in ALLOWED if name == key or name.startswith(key + ".")]
    return ALLOWED[max(matches, key=len)] if matches else None


def within(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


LAYERED = [name for name in MODULES if rule_for(name) is not None]


@pytest.mark.parametrize("name", LAYERED)
def test_imports_go_downwards_only(name: str):
    allowed = rule_for(name)
    assert allowed is not None
    imports = imports_of(name)
    upward = sorted(f"{m} (line {imports[m]})" for m in imports if not within(m, allowed + (name,)))
    assert not upward, f"{name} imports upwards: {', '.join(upward)}"


def test_io_never_imports_the_runtime_or_anything_above_it():
    above = ("d2merge.runtime", "d2merge.planning", "d2merge.engine", "d2merge.export", "d2merge.verify",
             "d2merge.api", "d2merge.many")
    found = sorted(f"{name} -> {m}" for name in MODULES if name.startswith("d2merge.io")
                   for m in imports_of(name) if within(m, above))
    assert not found, "io imports upwards: " + ", ".join(found)


def test_the_engine_knows_nothing_of_exporters():
    imports = imports_of("d2merge.engine")
    assert not any(m.startswith("d2merge.export") or m == "d2merge.api" for m in imports)


def test_nothing_imports_the_cli():
    found = sorted(name for name in MODULES if name != "d2merge.__main__" and not within(name, ("d2merge.cli",))
                   and any(within(m, ("d2merge.cli",)) for m in imports_of(name)))
    assert not found, f"the CLI is the top layer; imported by {', '.join(found)}"


def test_every_module_is_in_the_architecture_table():
    table = (ROOT / "docs" / "architecture.md").read_text()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent.name != "methods":
            continue
        rel = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        assert f"`{rel}`" in table or path.name in table or (folder in table and path.parent.name == "methods"), (
            f"docs/architecture.md does not say what {rel} owns")


def test_the_option_models_and_the_cli_load_no_torch():
    """Every option model and every command module import without torch: `d2merge --help` and a refused
    flag answer before any heavy import."""
    names = sorted(n for n in MODULES if within(n, ("d2merge.options", "d2merge.cli")) and n != "d2merge.cli.__main__")
    code = (f"import sys, importlib\nfor n in {names!r}: importlib.import_module(n)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules)\n"
            "assert not heavy, heavy")
    done = run_python(["-c", code], timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_html_pages_load_no_torch():
    """`d2merge.reports` renders pages from report records; importing it must not import torch."""
    code = ("import sys, d2merge.reports.html, d2merge.reports.bench_page, d2merge.reports.many_page, "
            "d2merge.reports.verify_page; assert 'torch' not in sys.modules, 'torch imported'")
    done = run_python(["-c", code], timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("first", ["names", "modules"])
def test_the_package_names_merge_and_plan_are_the_api_functions(first: str):
    """``d2merge.merge`` and ``d2merge.plan`` are the API's functions whichever is touched first: the
    package's names or the modules that define and plan them (loading a submodule binds its name on
    the package, so a submodule named like an API function would shadow it)."""
    modules = "import d2merge.api, d2merge.planning, d2merge.planning.build, d2merge.engine, d2merge.export.hf_folder\n"
    names = "merge, plan = d2merge.merge, d2merge.plan\n"
    code = ("import types, d2merge\n" + (names + modules if first == "names" else modules + names)
            + "assert merge is d2merge.api.merge and plan is d2merge.api.plan, (merge, plan)\n"
            "assert d2merge.merge is merge and d2merge.plan is plan, (d2merge.merge, d2merge.plan)\n"
            "assert not isinstance(d2merge.merge, types.ModuleType) and callable(d2merge.plan)")
    done = run_python(["-c", code], timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_submodule_shares_a_name_of_the_package_face():
    """Loading a submodule binds its name on the package, so a module named like one of d2merge's own
    names (``merge``, ``plan``, ...) would replace the API's function once anything imported it."""
    import d2merge

    clash = sorted(name for name in (*d2merge._LAZY, *d2merge.__all__) if f"d2merge.{name}" in MODULES)
    assert not clash, f"submodules named like the package's API names: {clash}"
