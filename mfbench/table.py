"""Every table mfbench prints to a terminal, through one helper (tabulate)."""
from __future__ import annotations


def table(rows, header=None, right=(), indent: int = 0) -> str:
    """Rows of already-formatted cells as aligned columns two spaces apart; with a header, a
    dashed rule under it. Columns whose index is in `right` are right-aligned (numbers)."""
    from tabulate import tabulate

    rows = [[str(c) for c in r] for r in rows]
    columns = len(header) if header else len(rows[0]) if rows else 0
    text = tabulate(rows, headers=header or (), tablefmt="simple" if header else "plain", disable_numparse=True,
                    colalign=["right" if i in right else "left" for i in range(columns)], preserve_whitespace=True)
    return "\n".join(" " * indent + line.rstrip() for line in text.splitlines())
