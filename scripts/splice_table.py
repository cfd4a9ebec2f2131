#!/usr/bin/env python3
"""Copy the first Markdown table of a generated report into a hand-written README.

    python scripts/splice_table.py results/compare/cells.md results/compare/README.md

The README marks where the table goes with ``<!-- table: cells.md -->`` and
``<!-- /table -->`` on lines of their own; everything between them is replaced, so a
README's copy of a regenerated table can never go stale.
"""
import sys
from pathlib import Path


def first_table(text: str) -> list[str]:
    lines, out = text.splitlines(), []
    for line in lines:
        if line.startswith("|"):
            out.append(line)
        elif out:
            break
    return out


def main(src: str, dest: str) -> None:
    table = first_table(Path(src).read_text())
    if not table:
        sys.exit(f"{src}: no Markdown table found")
    start, end = f"<!-- table: {Path(src).name} -->", "<!-- /table -->"
    lines = Path(dest).read_text().splitlines()
    try:
        i = lines.index(start)
        j = lines.index(end, i)
    except ValueError:
        sys.exit(f"{dest}: needs the lines {start!r} and {end!r}")
    lines[i + 1:j] = table
    Path(dest).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
