"""Pre-tokenized data files for the native trainer, written from text or JSONL.

File format (little-endian; docs/native.md has the full description):

    offset  size  field
    0       8     magic b"MFBTOKS\\0"
    8       4     version (1)
    12      4     flags (bit 0: a loss mask follows the ids)
    16      4     vocab_size of the tokenizer that wrote it
    20      4     reserved (0)
    24      8     count: number of tokens
    32      4*n   token ids, uint32
    ...     n     (if flag bit 0) mask, uint8: 1 = the token is a loss target, 0 = not

Documents are concatenated in one stream (the tokenizer's end-of-text token after each);
the trainer cuts it into windows of seq_len + 1 tokens.
"""
from __future__ import annotations

import json
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

from mfbench.errors import InputError
from mfbench.files import atomic

MAGIC = b"MFBTOKS\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ")  # 32 bytes
FLAG_MASK = 1
EOS_CANDIDATES = ("<|endoftext|>", "<|im_end|>", "<eos>", "</s>")


@dataclass
class TokenData:
    ids: array            # array('I') of token ids
    mask: array | None    # array('B') of 0/1, or None: every token is a target
    vocab_size: int


def write_token_file(path: str | Path, ids, vocab_size: int, mask=None) -> Path:
    """Write ids (and an optional 0/1 mask of the same length) atomically."""
    path = Path(path)
    ids = ids if isinstance(ids, array) and ids.typecode == "I" else array("I", ids)
    if mask is not None:
        mask = mask if isinstance(mask, array) and mask.typecode == "B" else array("B", (1 if m else 0 for m in mask))
        if len(mask) != len(ids):
            raise InputError(path, None, f"mask has {len(mask)} entries for {len(ids)} tokens (expected equal lengths)")
    if len(ids) == 0:
        raise InputError(path, None, "no tokens to write (expected a non-empty input)")
    check_targets(path, mask)
    top = max(ids)
    if top >= vocab_size:
        raise InputError(path, None, f"token id {top} is out of the vocabulary (expected ids < {vocab_size})")
    if sys.byteorder != "little":
        ids = array("I", ids)
        ids.byteswap()
    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, FLAG_MASK if mask is not None else 0, vocab_size, 0, len(ids)))
        f.write(ids.tobytes())
        if mask is not None:
            f.write(mask.tobytes())
    return path


def check_targets(path: str | Path, mask) -> None:
    """A mask that marks no token as a loss target trains on nothing (a loss of 0.0)."""
    if mask is not None and not any(mask):
        raise InputError(path, None, "no token is a loss target: the mask is all zeros (expected at least one "
                         "target, e.g. a JSONL line with a non-empty response)")


def read_token_file(path: str | Path) -> TokenData:
    """Read and validate a token file; any inconsistency is an InputError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(path, None, f"cannot read: {e.strerror or e}") from None
    if len(raw) < HEADER.size:
        raise InputError(path, None, f"file shorter than its {HEADER.size}-byte header")
    magic, version, flags, vocab, _, count = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise InputError(path, None, "bad magic (expected a token file starting with MFBTOKS)")
    if version != VERSION:
        raise InputError(path, None, f"format version {version} (expected {VERSION})")
    has_mask = bool(flags & FLAG_MASK)
    want = HEADER.size + 4 * count + (count if has_mask else 0)
    if len(raw) != want:
        raise InputError(path, None, f"{'truncated' if len(raw) < want else 'trailing bytes'}: "
                                     f"{len(raw)} bytes for {count} tokens (expected {want} bytes)")
    ids = array("I")
    ids.frombytes(raw[HEADER.size:HEADER.size + 4 * count])
    if sys.byteorder != "little":
        ids.byteswap()
    mask = None
    if has_mask:
        mask = array("B")
        mask.frombytes(raw[HEADER.size + 4 * count:])
        check_targets(path, mask)
    return TokenData(ids, mask, vocab)


def load_tokenizer(tokenizer: str | Path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a model folder holding one."""
    from tokenizers import Tokenizer

    p = Path(tokenizer)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise InputError(p, None, "tokenizer.json not found (expected the model's tokenizer.json or its folder)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # the tokenizers package raises plain Exceptions
        raise InputError(p, None, f"cannot load tokenizer: {str(e).splitlines()[0]}") from None


def find_eos(tok) -> int | None:
    for t in EOS_CANDIDATES:
        i = tok.token_to_id(t)
        if i is not None:
            return i
    return None


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------- cached inputs of `mfbench run`

def cache_dir(kind: str) -> Path:
    """$XDG_CACHE_HOME/mfbench/KIND (default ~/.cache/mfbench/KIND)."""
    import os
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mfbench" / kind


def digest(*parts: str | bytes) -> str:
    """A cache key: sha256 over the parts, each length-prefixed so that no two splits collide."""
    import hashlib
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:32]


def pydoc_text() -> str:
    """The standard library's pydoc_data.topics prose: sorted topics joined by blank lines."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def training_text(text: str, fmt: str) -> str:
    """The prose of a data file a tokenizer should learn from: a text file as it is, a JSONL
    file's prompt, response and text strings (lines that do not parse are left to tokenize)."""
    if fmt == "text":
        return text
    parts = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            parts += [v for k, v in obj.items() if k in ("prompt", "response", "text") and isinstance(v, str)]
    return "\n\n".join(parts)


def train_tokenizer(text: str, vocab_size: int, *, progress: bool = True) -> Path:
    """A byte-level BPE of at most `vocab_size` tokens (with <|endoftext|>) trained on `text`,
    cached by (text, vocab_size, tokenizers version); returns its tokenizer.json.

    The vocabulary ends smaller when the text runs out of merges; every id is < vocab_size.
    """
    import time

    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise InputError(None, None, f"vocab_size {vocab_size} is too small for a byte-level BPE (expected at least "
                         f"{len(alphabet) + 1}: 256 bytes and <|endoftext|>)")
    path = cache_dir("tokenizers") / f"bpe-{digest(text, str(vocab_size), tokenizers.__version__)}.json"
    if path.is_file():
        return path
    if progress:
        print(f"mfbench: training a byte-level BPE tokenizer (vocabulary up to {vocab_size:,}) on "
              f"{len(text.encode()) / 1e3:,.0f} kB of text; cached in {path.parent} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    with atomic(path) as tmp:
        tok.save(str(tmp))
    if progress:
        print(f"mfbench: tokenizer trained: {tok.get_vocab_size():,} tokens in {time.monotonic() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return path


def cached_tokens(data_path: str | Path, tokenizer: str | Path, fmt: str, *, progress: bool = True) -> dict:
    """`tokenize` into the token cache, keyed by the tokenizer, the data and the format;
    a second call with the same inputs reuses the file. Returns tokenize's counts."""
    import time

    tok_file = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
    try:
        key = digest(tok_file.read_bytes(), Path(data_path).read_bytes(), fmt)
    except OSError as e:
        raise InputError(e.filename, None, f"cannot read: {e.strerror or e}") from None
    path = cache_dir("tokens") / f"{key}.bin"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    progress = progress and Path(data_path).stat().st_size > 1_000_000  # smaller files take under a second
    if progress:
        print(f"mfbench: tokenizing {data_path} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    counts = tokenize(data_path, tok_file, path, fmt=fmt)
    with atomic(meta) as tmp:
        tmp.write_text(json.dumps(counts))
    if progress:
        print(f"mfbench: {counts['tokens']:,} tokens in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return counts


def tokenize(input_path: str | Path, tokenizer: str | Path, out_path: str | Path, *,
             fmt: str = "auto", eos: bool = True) -> dict:
    """Tokenize a text or JSONL file into a token file; return counts.

    fmt "text": the whole file is one document (encoded in blocks of lines). fmt "jsonl": one
    JSON object a line, either {"prompt", "response"} (only the response and its end-of-text
    token are loss targets) or {"text"} (every token is a target). "auto" picks by suffix.
    """
    input_path, out_path = Path(input_path), Path(out_path)
    if fmt == "auto":
        fmt = "jsonl" if input_path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "text"
    if fmt not in ("text", "jsonl"):
        raise InputError(None, "format", f"unknown format {fmt!r} (expected text, jsonl or auto)")
    for name, path in (("input", input_path), ("tokenizer", Path(tokenizer))):
        if out_path.exists() and path.exists() and out_path.samefile(path):
            raise InputError(out_path, "--out", f"is the {name} file (expected a new path: writing the tokens there "
                             f"would replace {path})")
    tok = load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos_id = find_eos(tok) if eos else None
    try:
        text = input_path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(input_path, None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(input_path, None, "not UTF-8 text") from None
    ids: list[int] = []
    mask: list[int] | None = None
    docs = 0
    if fmt == "text":
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), 512):
            ids.extend(_encode(tok, "".join(lines[i:i + 512])))
        if eos_id is not None:
            ids.append(eos_id)
        docs = 1
    else:
        mask = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(input_path, f"line {n}", f"not valid JSON: {e.msg}") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                p, r = _encode(tok, obj["prompt"]), _encode(tok, obj["response"])
                if eos_id is not None:
                    r.append(eos_id)
                ids += p + r
                mask += [0] * len(p) + [1] * len(r)
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                t = _encode(tok, obj["text"]) + ([eos_id] if eos_id is not None else [])
                ids += t
                mask += [1] * len(t)
            else:
                raise InputError(input_path, f"line {n}",
                                 'expected an object with string fields "prompt" and "response", or "text"')
            docs += 1
    if not ids:
        raise InputError(input_path, None, "no text to tokenize (expected a non-empty file)")
    check_targets(input_path, mask)
    write_token_file(out_path, ids, vocab, mask)
    return {"path": str(out_path), "tokens": len(ids), "documents": docs, "vocab_size": vocab,
            "masked_targets": None if mask is None else sum(mask)}
