"""Helpers for tests that feed the native trainer bad input: safetensors files taken apart and
put back together, the reference library's verdict on them, raw token files, and the
contract every run must keep (exit 0; or exit 2 with one `mfbench-train: error:` line; or a
diverged run's exit 1 with one line; never a signal or a hang)."""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

TOKEN_HEADER = struct.Struct("<8sIIIIQ")  # magic, version, flags (bit 0: mask), vocab, reserved, count


def safetensors_parts(raw: bytes) -> tuple[dict, bytes]:
    """(header as a dict, data section) of a well-formed file."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def safetensors_bytes(header: dict, data: bytes, pad: bool = True) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def refused_by_library(raw: bytes) -> bool:
    """Whether the reference `safetensors` library refuses the file (it validates the whole
    header when it opens one)."""
    from safetensors import safe_open
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(raw)
        f.flush()
        try:
            with safe_open(f.name, framework="numpy") as st:
                st.keys()
        except Exception:
            return True
    return False


def raw_token_file(path: Path, ids: list[int], vocab: int, mask: list[int] | None = None,
                   count: int | None = None) -> Path:
    """A token file written byte by byte (the Python writer refuses some of what tests need)."""
    body = struct.pack(f"<{len(ids)}I", *ids) + (bytes(mask) if mask is not None else b"")
    path.write_bytes(TOKEN_HEADER.pack(b"MFBTOKS\0", 1, 1 if mask is not None else 0, vocab, 0,
                                       len(ids) if count is None else count) + body)
    return path


class Violation(AssertionError):
    pass


def check_contract(r: subprocess.CompletedProcess, what: str) -> str:
    """The outcome class of one run: "ok", "refused" (exit 2, one error line) or "diverged"
    (exit 1, one line); anything else (a signal, a traceback-like dump, several lines) raises."""
    lines = (r.stderr or "").strip().splitlines()
    if r.returncode == 0:
        return "ok"
    if r.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("mfbench-train: error: "):
        if r.returncode == 1 and "training diverged" not in lines[0]:
            raise Violation(f"{what}: exit 1 that is not a divergence: {lines[0]}")
        return "refused" if r.returncode == 2 else "diverged"
    raise Violation(f"{what}: exit {r.returncode}, stderr {r.stderr[-2000:]!r}")
