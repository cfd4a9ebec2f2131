"""scripts/splice_table.py: a README's copy of a generated table is replaced, nothing else."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "splice_table.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_replaces_only_the_marked_block(tmp_path):
    src = tmp_path / "cells.md"
    src.write_text("# report\n\nintro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nafter\n\n| other | table |\n")
    dest = tmp_path / "README.md"
    dest.write_text("top\n<!-- table: cells.md -->\n| a | b |\n|---|---|\n| 0 | 0 |\n<!-- /table -->\nbottom\n")
    assert run(src, dest).returncode == 0
    assert dest.read_text() == ("top\n<!-- table: cells.md -->\n| a | b |\n|---|---|\n| 1 | 2 |\n"
                                "<!-- /table -->\nbottom\n")


def test_missing_markers_names_the_file_and_writes_nothing(tmp_path):
    src = tmp_path / "cells.md"
    src.write_text("| a |\n|---|\n| 1 |\n")
    dest = tmp_path / "README.md"
    dest.write_text("no markers here\n")
    r = run(src, dest)
    assert r.returncode != 0 and "README.md" in r.stderr and "<!-- table: cells.md -->" in r.stderr
    assert dest.read_text() == "no markers here\n"


def test_compare_readme_carries_the_current_cells_table():
    root = SCRIPT.parents[1] / "results" / "compare"
    readme, cells = (root / "README.md").read_text(), (root / "cells.md").read_text()
    table = [l for l in cells.splitlines() if l.startswith("| ")]
    assert table and all(line in readme for line in table)
