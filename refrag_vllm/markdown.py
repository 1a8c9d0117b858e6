"""The one markdown-table writer of the project's reports (evaluation, probes, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table_lines(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A markdown table as lines: the header's cells, the rule, then one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]
