"""The README stays a short front door, and every link between it and the docs/ pages lands somewhere."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from conftest import REPO

PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250


def anchors(page: Path) -> set[str]:
    """The heading anchors of a markdown page, as GitHub makes them (code blocks left out)."""
    out, code = set(), False
    for line in page.read_text().splitlines():
        code ^= line.startswith("```")
        if not code and (heading := re.match(r"#+ (.*)", line)):
            out.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_readme_is_a_front_door_of_at_most_250_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES
    expected = {"design.md", "deployment.md", "reliability.md", "using-the-prompt.md", "flags.md", "results.md",
                "performance.md"}  # fmt: skip
    assert {p.name for p in (REPO / "docs").glob("*.md")} == expected
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", "\n".join(lines)))
    assert linked == expected, f"the README links no page for: {sorted(expected - linked)}"


def test_every_link_between_the_pages_resolves():
    broken = []
    for name in PAGES:
        page = REPO / name
        for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"https?://", link):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            if not path.exists():
                broken.append(f"{name}: {link} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{name}: {link} (no such heading)")
    assert broken == []


def test_the_paper_tasks_tables_are_the_benchmark_json():
    """docs/results.md's tables of the paper's three tasks and SmolLM2 are those paper_tasks.py renders from its
    JSON, and the page counts the grid runs that the JSON holds."""
    spec = importlib.util.spec_from_file_location("paper_tasks", REPO / "benchmarks" / "paper_tasks.py")
    paper_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper_tasks)
    result = json.loads((REPO / "benchmarks" / "results" / "paper_tasks.json").read_text())
    page = (REPO / "docs" / "results.md").read_text()
    tables = {paper_tasks.results_table: 3, paper_tasks.local_search_table: 3, paper_tasks.prompt_strength_table: 6}
    for render, rows in tables.items():  # each with at least that many rows of figures
        table = render(result)
        assert table.count("\n") >= rows + 1, f"{render.__name__}: fewer than {rows} rows of figures in the JSON"
        assert table in page, f"rerun paper_tasks.py --cached_only and paste its {render.__name__}"
    grid = len(paper_tasks.grid_runs())
    done = grid - len(result["missing_runs"])
    assert re.search(rf"\b{done} of the {grid} runs\b", page), f"docs/results.md should say {done} of the {grid} runs"
