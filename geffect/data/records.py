"""TOFU-format question-answer records read from JSON or JSONL files.

Fields: ``question`` and ``answer`` (required), ``paraphrased_answer`` and ``perturbed_answer``
(list, optional); every other field is kept in ``attributes`` (e.g. ``author``, ``group``).
A record with a ``text`` field instead (a corpus, as WMDP's and Spunge's forget sets are) is plain
text: question empty, every token of the text counted by the objectives (GA, NPO, RMU …).
Bad input raises :class:`DataError` naming the file, the line and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from geffect.errors import DataError


@dataclass
class QARecord:
    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answer: list[str] = field(default_factory=list)
    attributes: dict = field(default_factory=dict)
    source: str = ""  # 'file:line' where the record came from, for error messages


_KNOWN = ("question", "answer", "paraphrased_answer", "perturbed_answer")


def record_from_dict(obj, where: str) -> QARecord:
    """Validate one JSON object; ``where`` is ``file:line`` for error messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and "question" not in obj and "answer" not in obj:     # a plain-text (corpus) record
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        return QARecord("", obj["text"], attributes={k: v for k, v in obj.items() if k != "text"}, source=where)
    for name in ("question", "answer"):
        if name not in obj:
            raise DataError(f"{where}: missing field '{name}'")
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise DataError(f"{where}: field '{name}' must be a non-empty string")
    para = obj.get("paraphrased_answer")
    if para is not None and not isinstance(para, str):
        raise DataError(f"{where}: field 'paraphrased_answer' must be a string")
    pert = obj.get("perturbed_answer", [])
    if isinstance(pert, str):
        pert = [pert]
    if not isinstance(pert, list) or not all(isinstance(p, str) for p in pert):
        raise DataError(f"{where}: field 'perturbed_answer' must be a list of strings")
    attrs = {k: v for k, v in obj.items() if k not in _KNOWN}
    return QARecord(obj["question"], obj["answer"], para, list(pert), attrs, source=where)


def load_records(path: str | Path) -> list[QARecord]:
    """Read a data file whatever its suffix, by its content: a JSON array of objects, or JSON Lines
    (one object per line, as TOFU distributes its ``.json`` files). Errors name file, line and field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file (give the JSON or JSON Lines file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None
    body = text.lstrip("\ufeff")
    if body.lstrip().startswith("["):
        records = [record_from_dict(obj, f"{path}:{line}") for obj, line in _json_array(body, path)]
    else:
        records = []
        for lineno, line in enumerate(body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
            records.append(record_from_dict(obj, f"{path}:{lineno}"))
    if not records:
        raise DataError(f"{path}: empty split (no records)")
    return records


def _json_array(text: str, path: Path):
    """The items of a JSON array with the line each starts on."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        yield obj, text.count("\n", 0, i) + 1
        i = end
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] == "]":
            return
        else:
            line = text.count("\n", 0, min(i, n)) + 1
            raise DataError(f"{path}:{line}: invalid JSON (expected ',' or ']' between records)")


def record_to_dict(r: QARecord) -> dict:
    """The JSON object :func:`record_from_dict` reads back (attributes as top-level fields)."""
    if not r.question:
        return {"text": r.answer} | dict(r.attributes)
    out = {"question": r.question, "answer": r.answer}
    if r.paraphrased_answer is not None:
        out["paraphrased_answer"] = r.paraphrased_answer
    if r.perturbed_answer:
        out["perturbed_answer"] = list(r.perturbed_answer)
    return out | dict(r.attributes)


def write_records(records: list[QARecord], path: str | Path) -> Path:
    """Write records as a JSON array (atomically: a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([record_to_dict(r) for r in records], indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return path
