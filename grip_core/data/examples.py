"""QAExample and the readers for user files: JSONL, CSV/TSV, TOFU-style JSON.

Every reader error is a `DataFileError` (a ValueError) whose message starts with
"<path>:<line>:", so the CLI and the app can show the user exactly where a file is wrong.

Accepted rows: `question` + `answer` (a QA pair; `paraphrased_question` is kept when present,
as in TOFU), or `text` alone (a plain passage, e.g. a forget corpus; encode_qa then trains
on every token). Optional columns: id, domain, entity, text; anything else goes to `meta`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..moe.errors import GripStudioError


@dataclass
class QAExample:
    """One fact: a QA pair (question, short answer) and/or a passage `text`."""
    id: str
    question: str
    answer: str
    domain: str = ""
    entity: str = ""
    text: str = ""                    # the fact as a sentence (or a passage, for text-only rows)
    paraphrase: str | None = None     # the question reworded, if known
    meta: dict = field(default_factory=dict)   # other columns (split, scenario, attribute, ...)

    @property
    def is_text_only(self) -> bool:
        return not self.question


class DataFileError(GripStudioError, ValueError):
    """A user data file cannot be read; the message names the file and line."""

    def __init__(self, path: str | Path, line: int | str | None, message: str):
        message = " ".join(str(message).split("\n"))      # one line, whatever a row's keys hold
        self.path, self.line, self.detail = str(path), line, message
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


_KNOWN = {"id", "question", "answer", "domain", "entity", "text", "paraphrased_question", "paraphrase"}


def _as_str(v) -> str:
    return "" if v is None else (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def row_to_example(row: dict, path: str | Path, line: int | str | None, default_id: str) -> QAExample:
    """Validate one row (a dict of columns) and turn it into a QAExample."""
    if not isinstance(row, dict):
        raise DataFileError(path, line, f"expected an object with question/answer (or text), got {type(row).__name__}")
    cols = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    q, a, t = (_as_str(cols.get(c)).strip() for c in ("question", "answer", "text"))
    has_qa = "question" in cols or "answer" in cols
    if has_qa:
        missing = [c for c in ("question", "answer") if c not in cols]
        if missing:
            raise DataFileError(path, line, f"missing column {missing[0]!r} (found: {sorted(cols)})")
        if not q or not a:
            raise DataFileError(path, line, f"empty {'question' if not q else 'answer'}")
    elif "text" in cols:
        if not t:
            raise DataFileError(path, line, "empty text")
    else:
        raise DataFileError(path, line, f"missing columns: need 'question' and 'answer' (or 'text'); found {sorted(cols)}")
    para = _as_str(cols.get("paraphrased_question", cols.get("paraphrase"))).strip() or None
    return QAExample(id=_as_str(cols.get("id")).strip() or default_id, question=q, answer=a,
                     domain=_as_str(cols.get("domain")).strip(), entity=_as_str(cols.get("entity")).strip(),
                     text=t, paraphrase=para, meta={k: v for k, v in cols.items() if k not in _KNOWN})


def _read_jsonl(path: Path, text: str) -> list[tuple[int | str, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataFileError(path, n, f"invalid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_json(path: Path, text: str) -> list[tuple[int | str, dict]]:
    """A JSON array of objects, {"data": [...]}, or JSON lines saved as .json (as TOFU's files are)."""
    dec = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start] == "{":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":        # several objects: JSON lines
                return _read_jsonl(path, text)
            raise DataFileError(path, e.lineno, f"invalid JSON ({e.msg}, column {e.colno})") from None
        lists = [v for v in obj.values() if isinstance(v, list)] if "question" not in obj and "text" not in obj else []
        if not lists:
            return [(_line_of(text, start), obj)]
        if len(lists) > 1 and "data" not in obj:
            raise DataFileError(path, 1, f"ambiguous JSON object: several lists ({sorted(k for k, v in obj.items() if isinstance(v, list))}); "
                                         "expected an array of examples or {'data': [...]}")
        items = obj["data"] if isinstance(obj.get("data"), list) else lists[0]
        return [(f"item {i}", r) for i, r in enumerate(items)]    # no line numbers inside one object
    if text[start] != "[":
        raise DataFileError(path, _line_of(text, start), "expected a JSON array, an object or JSON lines")
    rows, pos = [], start + 1
    while True:                              # walk the array to know each element's line
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataFileError(path, _line_of(text, pos), "invalid JSON (unterminated array)")
        if text[pos] == "]":
            return rows
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFileError(path, e.lineno, f"invalid JSON ({e.msg}, column {e.colno})") from None
        rows.append((_line_of(text, pos), obj))
        pos = end


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    try:
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if not ({"question", "answer"} <= set(header) or "text" in header):
            raise DataFileError(path, 1, f"missing columns: need 'question' and 'answer' (or 'text'); header is {header}")
        rows = []
        for row in reader:
            if None in row:
                raise DataFileError(path, reader.line_num,
                                    f"{len(header) + len(row[None])} fields, header has {len(header)}")
            if not any((v if isinstance(v, str) else "").strip() for v in row.values()):
                continue
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise DataFileError(path, reader.line_num or 1, f"malformed CSV ({e})") from None
    return rows


READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv}


def read_qa_file(path: str | Path, name: str | None = None) -> list[QAExample]:
    """Read a JSONL / CSV / TSV / TOFU-style JSON file of QA pairs (or texts) into QAExamples.

    Raises DataFileError naming the file and line for: missing file, unknown extension,
    empty file, malformed JSON/CSV, a row without question+answer (or text), empty values.
    `name`: how errors name the file (e.g. an upload's own name instead of a server temp path).
    """
    try:
        return _read_qa_file(Path(path))
    except DataFileError as e:
        if name is None:
            raise
        raise DataFileError(name, e.line, e.detail) from None
    except RecursionError:       # JSON nested thousands deep
        raise DataFileError(name or path, None, "JSON nested too deeply") from None


def _read_qa_file(path: Path) -> list[QAExample]:
    if not path.is_file():
        raise DataFileError(path, None, "file not found")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataFileError(path, None, f"unsupported file type {path.suffix!r}; use one of {sorted(READERS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFileError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataFileError(path, None, f"cannot read the file ({e.strerror or e})") from None
    if not text.strip():
        raise DataFileError(path, None, "empty file: no examples")
    if "\x00" in text:
        raise DataFileError(path, _line_of(text, text.index("\x00")), "NUL byte: not a text file")
    rows = reader(path, text)
    if not rows:
        raise DataFileError(path, None, "no examples (only blank lines or a header)")
    return [row_to_example(r, path, n, f"{path.stem}-{i}") for i, (n, r) in enumerate(rows)]
