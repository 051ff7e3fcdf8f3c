"""The README's figures come from raw files.

Every raw file the README cites exists, and every number in a table of measurements is found in
the raw files cited just before that table (at the precision the table prints it, or as a
percentage, in seconds where the file has milliseconds, or as the mean of a list of rounds). A figure edited by hand, or left
behind when its raw file was re-measured, fails here. A table is one of measurements when it
cites a raw file or sits under "## Results"; its first column (the row's name) is not checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
CITED = re.compile(r"docs/results/[\w.\-/]+(?:\{[\w.,\-]+\}[\w.\-]*)?")
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[+-]?\d+)?")


@dataclass
class Table:
    line: int  # 1-based line of its header
    header: list[str]
    rows: list[list[str]]  # body cells
    cited: list[Path]
    under_results: bool


def expand(citation: str) -> list[Path]:
    """A cited path, with `{a,b}` alternatives expanded; a folder stands for its JSON files."""
    if m := re.search(r"\{([^}]*)\}", citation):
        return [p for alt in m.group(1).split(",") for p in expand(citation[:m.start()] + alt + citation[m.end():])]
    path = ROOT / citation.rstrip(".,)")
    return sorted(path.rglob("*.json")) if path.is_dir() else [path]


def readme_tables() -> list[Table]:
    lines = README.read_text().splitlines()
    tables, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line
        stripped = line.strip()
        if stripped.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[-:| ]+\|", lines[i + 1].strip()):
            j = i + 2
            rows = []
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
                j += 1
            cited, k = [], i - 1
            while k >= 0 and not lines[k].startswith("#") and not lines[k].strip().startswith("|"):
                cited += [p for c in CITED.findall(lines[k]) for p in expand(c)]
                k -= 1
            header = [c.strip() for c in stripped.strip("|").split("|")]
            tables.append(Table(i + 1, header, rows, cited, section.startswith("## Results")))
            i = j
        else:
            i += 1
    return tables


def figures_of(paths: list[Path]) -> set[str]:
    """Every way a table may print a number of these files."""
    found: set[str] = set()

    def add(v: float) -> None:
        for scaled in (v, v * 100, v / 1000):
            for d in range(5):
                found.add(f"{scaled:.{d}f}")
                found.add(f"{scaled:,.{d}f}")
            found.update((f"{scaled:.1e}", f"{scaled:.2e}"))

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if re.fullmatch(r"-?\d+(\.\d+)?", str(key)):
                    add(float(key))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
            if len(node) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in node):
                add(sum(node) / len(node))  # per-round figures: their mean
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            add(float(node))
        elif isinstance(node, str):  # a figure the benchmark wrote into its own words
            found.update(n for n in NUMBER.findall(node))

    for path in paths:
        walk(json.loads(path.read_text()))
    return found


def first_number(cell: str) -> float | None:
    m = NUMBER.search(re.sub(r"`[^`]*`", "", cell))
    return float(m.group().replace(",", "")) if m else None


def half_ulp(cell: str) -> float:
    """Half the last printed digit of a cell's first number: how far rounding may have moved it."""
    m = NUMBER.search(re.sub(r"`[^`]*`", "", cell))
    text = m.group() if m else ""
    return 0.5 * 10 ** -(len(text.split(".")[1]) if "." in text else 0)


def ratio_of_column(table: Table, r: int, c: int, figure: str) -> bool:
    """A "÷ …" or "× …" column holds the figure to its left over that column's figure in the row
    whose ratio is 1 (the baseline), at the precision printed."""
    if c == 0 or c >= len(table.header) or not table.header[c].startswith(("÷", "×")):
        return False
    base_cell = next((row[c - 1] for row in table.rows if c < len(row) and first_number(row[c]) == 1.0), None)
    mine_cell = table.rows[r][c - 1]
    mine, base = first_number(mine_cell), first_number(base_cell) if base_cell else None
    if not (mine and base):
        return False
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    # the ratio of the printed operands, within the rounding of the figure and of both operands
    slack = 0.5 * 10 ** -decimals + mine / base * (half_ulp(mine_cell) / mine + half_ulp(base_cell) / base)
    return abs(mine / base - float(figure)) <= slack + 1e-9


def measured_tables() -> list[Table]:
    return [t for t in readme_tables() if t.cited or t.under_results]


def test_every_cited_raw_file_exists():
    missing = sorted({str(p.relative_to(ROOT)) for t in readme_tables() for p in t.cited if not p.exists()}
                     | {c for c in CITED.findall(README.read_text()) for p in expand(c) if not p.exists()})
    assert not missing, f"README cites raw files that are not there: {missing}"


@pytest.mark.parametrize("table", measured_tables(), ids=lambda t: f"README.md:{t.line}")
def test_every_figure_of_a_table_is_in_its_raw_files(table):
    assert table.cited, f"README.md:{table.line}: a results table that cites no raw file"
    figures = figures_of([p for p in table.cited if p.suffix == ".json" and p.exists()])
    strays = []
    for r, row in enumerate(table.rows):
        for c, cell in enumerate(row[1:], 1):
            cell = re.sub(r"`[^`]*`|±[\d.,?]+\w*", "", cell)  # commands, config values, intervals' half-widths
            strays += [n for n in NUMBER.findall(cell) if n.replace(",", "") not in figures and n not in figures
                       and not ratio_of_column(table, r, c, n)]
    assert not strays, f"README.md:{table.line}: figures found in none of {[p.name for p in table.cited]}: {strays}"


def test_the_readme_speaks_of_the_product_not_its_making():
    pattern = re.compile(r"issue #[0-9]|(this|last|earlier|previous) session|lent (a |the )?(gpu|device|machine)|bar: ?>=?",
                         re.IGNORECASE)
    offending = [f"{path.relative_to(ROOT)}:{n}" for path in [README, *sorted((ROOT / "docs").glob("*.md"))]
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offending, offending
