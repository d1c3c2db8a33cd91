"""What a newcomer reads: the README and docs stand on their own, and say nothing untrue."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
