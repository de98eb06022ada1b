"""The README is the user's manual: its configuration reference names every key the loader reads,
and no key it does not; its Layout section names every module there is."""

from __future__ import annotations

import re
from pathlib import Path

from balancer.config.load import config_keys

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def documented_keys(table: str, known: set[str]) -> set[str]:
    """The keys of the reference table's first column. A row's first cell lists keys in backticks:
    a full path (``pools.NAME.spawn.env``), then siblings written ``.cwd``; an indented row
    (``  .path``) continues the last full path, as its children or its siblings (whichever exists).
    A list's row (``routes[]``) documents its items' keys as ``key:`` in the row's text."""
    found: set[str] = set()
    anchor = ""
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not cells[1].strip().startswith("`"):
            continue
        first = cells[1]
        names = [name.strip() for name in re.findall(r"`([^`]+)`", first)]
        indented = first.startswith("   ") or first.strip().startswith("`  ")
        for name in names:
            if not name.startswith("."):
                anchor = name
                found.add(name)
                if name.endswith("[]"):
                    items = " ".join(re.findall(r"\{[^}]*\}", row))
                    found |= {f"{name}.{key}" for key in re.findall(r"(\w+): ", items)}
                continue
            parent = anchor if indented else anchor.rpartition(".")[0]
            child, sibling = f"{parent}{name}", f"{anchor.rpartition('.')[0]}{name}"
            found.add(child if child in known or sibling not in known else sibling)
    return found


def test_the_checker_reads_the_table_notation() -> None:
    table = ("| key | default | meaning |\n|---|---|---|\n"
             "| `a.b.c`, `.d` | | |\n| `a.e` | | |\n| `  .f`, `.g` | | |\n| `l[]` | | `{x: 1, y: 2}`, z: |\n")
    assert documented_keys(table, {"a.e.f", "a.g"}) == {"a.b.c", "a.b.d", "a.e", "a.e.f", "a.g",
                                                         "l[]", "l[].x", "l[].y"}


def test_the_configuration_reference_names_every_key() -> None:
    keys = set(config_keys())
    documented = documented_keys(section("Configuration reference"), keys)
    assert sorted(keys - documented) == [], "keys the README does not document"
    sections = {key.rpartition(".")[0] for key in keys}
    assert sorted(documented - keys - sections) == [], "documented keys that do not exist"


def test_the_layout_names_every_module() -> None:
    layout = section("Layout")
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "balancer").rglob("*.py"))
               if p.name != "__init__.py"]
    assert [m for m in modules if m not in layout] == []
