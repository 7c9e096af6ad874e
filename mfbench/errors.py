"""Errors a user can cause, and loading YAML into validated schemas.

Every bad input ends as one `InputError` naming the file, the field path and what is
expected; the CLI prints it on one line and exits with code 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pydantic
import yaml


class InputError(Exception):
    """Bad user input: `file: field: message`."""

    def __init__(self, file: str | Path | None, field: str | None, message: str):
        self.file, self.field, self.message = file, field, message
        where = ": ".join(str(p) for p in (file, field) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):  # picklable, so an error raised in a worker process reaches the parent
        return InputError, (self.file, self.field, self.message)


Schema = TypeVar("Schema", bound=pydantic.BaseModel)


def field_path(loc: tuple) -> str:
    """('memory', 'sharding', 'budget_mb') -> 'memory.sharding.budget_mb'; list indices as [i]."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validate(schema: type[Schema], data: object, file: str | Path | None = None) -> Schema:
    """Validate `data` against `schema`; the first problem becomes an InputError."""
    try:
        return schema.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        # pydantic puts union/tag names in loc for tagged unions; keep only real field names
        # and, for a union such as `int | "auto"`, the member type it was tried as
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
            not p.isidentifier() or p in ("int", "float", "str", "bool", "none"))))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = "missing required field"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs for the schema)"
        elif "input" in err and not isinstance(err["input"], (dict, list)) and "got" not in msg:
            got = repr(err["input"])
            msg = f"{msg} (got {got[:60] + '...' if len(got) > 60 else got})"
        raise InputError(file, field_path(loc) or None, msg) from None


def load_yaml(path: str | Path) -> object:
    """Read a YAML file; a missing file or a syntax error becomes an InputError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, None, "file not found") from None
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise InputError(path, None, f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} "
                         "(expected a YAML file)") from None
    except OSError as e:  # a folder, no permission, an I/O error
        raise InputError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InputError(path, None, f"not valid YAML: {at}{getattr(e, 'problem', None) or e}") from None


def apply_sets(data: dict, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """Apply `field.path=value` overrides (as `--set` gives them) to a loaded document.

    The value is read as YAML (`lr=3e-4` a number, `targets=[q_proj, v_proj]` a list); a path
    through a missing mapping creates it, so the schema, not this function, decides what is
    valid. Returns a new dict; `data` is not changed.
    """
    import copy
    data = copy.deepcopy(data)
    for item in sets:
        path, sep, text = item.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            raise InputError(None, "--set", f"expected field.path=value, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InputError(None, f"--set {path}", f"value is not valid YAML: {text!r}") from None
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[:depth + 1])
                raise InputError(None, f"--set {path}", f"{where} is a {type(child).__name__}, not a mapping of fields")
            node = child
        node[keys[-1]] = value
    return data


def load_schema(schema: type[Schema], path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Schema:
    """Load a YAML file into `schema`, after the `--set` overrides `sets` (see apply_sets)."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError(path, None, f"expected a mapping of fields at the top level, got {type(data).__name__}")
    return validate(schema, apply_sets(data, sets), path)


def did_you_mean(word: str, choices) -> str:
    """` (did you mean 'pixel8'?)` for the choice closest to a misspelt `word`, or ''."""
    import difflib
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def warn(message: str) -> None:
    """A problem worth knowing that does not stop the run: one line on stderr."""
    import sys
    print(f"mfbench: warning: {message}", file=sys.stderr)
