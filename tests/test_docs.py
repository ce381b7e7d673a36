"""The documentation holds together: every relative link resolves, and every experiment a design
record cites can still be applied to the code, so its figures can be measured again."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXPERIMENTS = ROOT / "docs" / "design" / "experiments"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_a_page_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.is_file() and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"


def test_every_experiment_is_cited_by_a_design_record():
    records = "".join(p.read_text() for p in (ROOT / "docs" / "design").glob("0*.md"))
    uncited = [p.name for p in EXPERIMENTS.iterdir() if f"experiments/{p.name}" not in records]
    assert not uncited, f"experiments no record links (cite them or drop them): {uncited}"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("patch", sorted(EXPERIMENTS.glob("*.patch")), ids=lambda p: p.name)
def test_an_experiment_patch_still_applies_to_the_code(patch):
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{patch.name} no longer applies: refresh it, or drop it and its figures\n{done.stderr}"
