"""A results table that grows as runs finish and survives a stop.

Rows go to `parts/part-NNNNN.parquet` in batches while a sweep runs (so a Ctrl-C, a crash or
a lost node loses at most one batch); `finish()` merges the previous table and the parts into
`results.parquet` and `results.csv` and removes the parts. Every row has a `key` (a hash of
its resolved configuration): `done_keys()` is what a resumed sweep skips.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mfbench.files import atomic, folder


class ResultsTable:
    def __init__(self, out: str | Path, schema: pa.Schema, flush_rows: int = 200, flush_s: float = 30.0):
        self.out, self.schema = Path(out), schema
        self.parts = folder(self.out / "parts")  # a file in the way or no permission: one line
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()

    def _files(self) -> list[Path]:
        main = self.out / "results.parquet"
        return ([main] if main.exists() else []) + sorted(self.parts.glob("part-*.parquet"))

    def read(self) -> pa.Table:
        """Every row written so far (the previous table and unmerged parts), in this schema."""
        # an older sweep may have had other axes: missing columns are null, extra ones kept
        table = pa.concat_tables([pq.read_table(f) for f in self._files()] + [self.schema.empty_table()],
                                 promote_options="permissive")
        return table.select(self.schema.names + [n for n in table.column_names if n not in self.schema.names])

    def done_keys(self) -> set[str]:
        return {k for f in self._files() for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush > self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            n = len(list(self.parts.glob("part-*.parquet")))
            with atomic(self.parts / f"part-{n:05d}.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), tmp)
            self.rows = []
        self.last_flush = time.monotonic()

    def finish(self) -> pa.Table:
        """Merge everything into results.parquet and results.csv; return the table."""
        import pyarrow.csv as pcsv
        self.flush()
        parts = sorted(self.parts.glob("part-*.parquet"))
        table = self.read()
        with atomic(self.out / "results.parquet") as tmp:
            pq.write_table(table, tmp)
        with atomic(self.out / "results.csv") as tmp:
            pcsv.write_csv(table, tmp)
        for p in parts:  # merged: the table above holds them
            p.unlink()
        self.parts.rmdir()
        return table

