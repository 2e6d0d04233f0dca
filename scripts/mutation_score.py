"""The mutation score of each module `make mutate` mutates, from mutmut's results in mutants/.

    .venv/bin/python scripts/mutation_score.py [--survivors] [--min 85]

A mutant is *killed* when a test failed (or timed out) with it. A surviving mutant is either
*equivalent* (no test can tell it from the original: the reasons are below, one line each) or a
gap in the tests. The score of a module is killed / (checked - equivalent). Mutants mutmut did not
run (``not checked``) are reported and left out. With ``--min``, exits 1 when a module is below.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

MUTANTS = Path("mutants")
KILLED = ("killed", "timeout", "caught by type check", "segfault")

# Whole families of equivalent mutants, recognised from the diff.
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|PRAGMA|BEGIN|COMMIT|ROLLBACK|"
                       r"SAVEPOINT|RELEASE|FROM|WHERE|INTO|VALUES)\b", re.IGNORECASE)  # fmt: skip


def family(minus: list[str], plus: list[str]) -> str | None:
    """The reason a mutant is equivalent when its whole family is, else None."""
    if (
        minus
        and len(minus) == len(plus)
        and all(
            a != b and a.lower() == b.lower() and SQL_WORDS.search(a)
            for a, b in zip(minus, plus, strict=True)
        )
    ):
        return "only the case of SQL text changed: SQLite reads keywords and names in any case"
    return None


# One mutant at a time: name -> why no test can tell it from the original.
EQUIVALENT: dict[str, str] = {}
_EQUIVALENT_FILE = Path(__file__).with_name("mutation_equivalents.json")
if _EQUIVALENT_FILE.exists():
    EQUIVALENT = json.loads(_EQUIVALENT_FILE.read_text())


def results() -> dict[str, dict[str, str]]:
    """module -> mutant name -> status."""
    found: dict[str, dict[str, str]] = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = str(meta.relative_to(MUTANTS))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        found[module] = {
            name: "not checked" if code is None else status_by_exit_code[code]
            for name, code in codes.items()
        }
    return found


_SOURCES: dict[str, dict[str, str]] = {}


def _functions(module: str) -> dict[str, str]:
    """Every function of a mutated module's copy in mutants/, by name, as source text."""
    if module not in _SOURCES:
        tree = ast.parse((MUTANTS / module).read_text())
        _SOURCES[module] = {
            node.name: ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
    return _SOURCES[module]


def diff(module: str, name: str) -> tuple[list[str], list[str]]:
    """The lines a mutant removes and adds, against the original function."""
    function = name.rsplit(".", 1)[1]
    found = _functions(module)
    original = found.get(function.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
    mutated = found.get(function, "")
    lines = list(
        difflib.unified_diff(original.splitlines(), mutated.splitlines(), lineterm="", n=0)
    )
    minus = [line[1:].strip() for line in lines if line[:1] == "-" and line[:3] != "---"]
    plus = [line[1:].strip() for line in lines if line[:1] == "+" and line[:3] != "+++"]
    return minus[1:], plus[1:]  # the first lines are the two functions' names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survivors", action="store_true", help="print each unexplained survivor")
    parser.add_argument("--min", type=float, default=None, help="fail below this score (percent)")
    args = parser.parse_args()
    if not MUTANTS.is_dir():
        print("no mutants/ here: run `make mutate` first", file=sys.stderr)
        return 2

    rows, unexplained, families = [], [], Counter[str]()
    for module, statuses in results().items():
        counts = Counter(statuses.values())
        killed = sum(counts[s] for s in KILLED)
        equivalent = 0
        for name, status in statuses.items():
            if status not in ("survived", "no tests"):
                continue
            if name in EQUIVALENT:
                equivalent += 1
                families[f"named with its reason in {_EQUIVALENT_FILE.name}"] += 1
            elif reason := family(*diff(module, name)):
                equivalent += 1
                families[reason] += 1
            else:
                unexplained.append((module, name, status))
        checked = len(statuses) - counts["not checked"]
        scored = checked - equivalent
        score = 100.0 * killed / scored if scored else 100.0
        rows.append((module, len(statuses), killed, equivalent, scored - killed,
                     counts["not checked"], score))  # fmt: skip

    print(f"{'module':34} {'mutants':>7} {'killed':>6} {'equiv':>5} {'left':>5} {'unrun':>5} score")
    for module, total, killed, equivalent, left, unrun, score in rows:
        print(f"{module:34} {total:7} {killed:6} {equivalent:5} {left:5} {unrun:5} {score:5.1f}%")
    for reason, count in families.items():
        print(f"  {count} equivalent: {reason}")
    if args.survivors:
        for module, name, status in unexplained:
            minus, plus = diff(module, name)
            print(
                f"\n{status}: {name}\n  - " + "\n  - ".join(minus) + "\n  + " + "\n  + ".join(plus)
            )
    if args.min is not None and any(row[-1] < args.min for row in rows if row[-2] < row[1]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
