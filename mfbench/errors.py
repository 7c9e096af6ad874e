"""Errors a user can cause, and loading YAML into validated schemas.

Every bad input ends as one `InputError` naming the file, the field path and what is
expected; the CLI prints it on one line and exits with code 2.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, TypeVar

import pydantic
import yaml

MAX_LINE = 400     # characters of an error line: a 10 MB value is shown by its start
MAX_DEPTH = 50     # nesting levels a YAML file may have (a workload needs 4)


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line of at most `limit` characters (what a terminal and a log can take)."""
    text = " ".join(str(text).splitlines())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class InputError(Exception):
    """Bad user input: `file: field: message`, on one line."""

    def __init__(self, file: str | Path | None, field: str | None, message: str):
        self.file, self.field, self.message = file, field, message
        where = ": ".join(str(p) for p in (file, field) if p)
        super().__init__(one_line(f"{where}: {message}" if where else message))

    def __reduce__(self):  # picklable, so an error raised in a worker process reaches the parent
        return InputError, (self.file, self.field, self.message)


Schema = TypeVar("Schema", bound=pydantic.BaseModel)

# The number types of every schema: an int is not a bool or a float (`steps: true` is not 1
# step), and a float is finite (`.nan` and `.inf` make every result NaN) and not a bool.
Int = Annotated[int, pydantic.Strict()]
Number = Annotated[float, pydantic.Strict(), pydantic.Field(allow_inf_nan=False)]


class Strict(pydantic.BaseModel):
    """A schema: unknown fields are errors, values are frozen once validated."""
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


class _Refused(yaml.YAMLError):
    def __init__(self, problem: str, mark):
        self.problem, self.problem_mark = problem, mark


class Loader(yaml.SafeLoader):
    """YAML as the 1.2 core schema reads it, within limits.

    Scalars: only true/false are booleans (`yes`, `no`, `on`, `off` stay strings, so
    `steps: yes` is refused by the schema instead of meaning 1 step), `1e-4` is a number,
    `017` is 17, and there are no sexagesimal numbers or timestamps. Aliases (`*name`) are
    refused: one alias can expand to gigabytes (billion laughs), and no mfbench file needs
    one. Nesting deeper than MAX_DEPTH is refused before the composer's recursion is.
    """
    yaml_implicit_resolvers: ClassVar[dict] = {}
    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _Refused(f"alias *{self.peek_event().anchor} (expected plain values: aliases and anchors are "
                           "not supported)", self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)


for _tag, _pattern in (
        ("null", r"~|null|Null|NULL|"),
        ("bool", r"true|True|TRUE|false|False|FALSE"),
        ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")):
    Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), None)
Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)


def parse_yaml(text: str) -> object:
    """Parse YAML text with `Loader`; raises yaml.YAMLError."""
    return yaml.load(text, Loader=Loader)


def load_yaml(path: str | Path) -> object:
    """Read a YAML file (see Loader); a missing file or a syntax error becomes an InputError."""
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
        return parse_yaml(text)
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
            value = parse_yaml(text)
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
