"""The fault suite prints one table of what each fault cost, after the tests (also in CI logs)."""

from __future__ import annotations

from typing import Any

ROWS: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    write = terminalreporter.write_line
    write("")
    write("fault suite (steady GET load from 4 keep-alive clients; times from the fault's injection)")
    write("| fault | requests | failed | failures by kind | p99 during fault | out of rotation after | back in after |")
    write("|---|---|---|---|---|---|---|")
    for row in ROWS:
        kinds = ", ".join(f"{k}: {v}" for k, v in row["failures"].items()) or "-"
        write(f"| {row['fault']} | {row['requests']} | {sum(row['failures'].values())} | {kinds} | "
              f"{row['p99_ms']:.0f} ms | {row['eject']} | {row['readmit']} |")
