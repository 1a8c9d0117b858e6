"""QA derivation from the API descriptions of the Python documentation.

No real question-answering data set is available offline, so a RAG QA set is
derived from API descriptions (:func:`derive_qa`).  For every ``.. function::``,
``.. method::``, ``.. class::``, ``.. exception::``, ``.. attribute::``,
``.. data::`` (and decorator / classmethod / staticmethod / coroutine variants)
directive, the qualified name is built from the current ``.. module::`` /
``.. currentmodule::`` and the enclosing ``.. class::`` (``os.path.join``,
``io.StringIO.getvalue``).  The question comes from a template per kind
("What does os.path.join() do?"), the answer is the first sentence of the
description, the gold passage is the rendered signature plus the description,
and the other passages are gold passages of *other* entries of the same page
(hard negatives that look alike), shuffled deterministically.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .records import QAExample, stable_hash
from .rst import _EXPLICIT_RE, _block_end, _dedent, _finish, _indent, _normalize, _split_header, clean_rst

MAX_PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 100
ANSWER_CHARS = (20, 300)

_FUNCTION_KINDS = {
    "function", "method", "decorator", "classmethod", "staticmethod", "coroutinefunction",
    "coroutinemethod", "abstractmethod", "awaitablefunction", "decoratormethod",
}
_CLASS_KINDS = {"class", "exception"}
_VALUE_KINDS = {"attribute", "data", "property"}
_API_RE = re.compile(
    r"^( *)\.\. (?:py:)?(" + "|".join(sorted(_FUNCTION_KINDS | _CLASS_KINDS | _VALUE_KINDS)) + r")::\s*(\S.*)$"
)
_MODULE_RE = re.compile(r"^ *\.\. (?:py:)?(?:module|currentmodule)::\s*(\S+)")
_NAME_RE = re.compile(r"@?([A-Za-z_][\w.]*)")
_SIG_PREFIX = {
    "class": "class ", "exception": "exception ", "classmethod": "classmethod ",
    "staticmethod": "static ", "coroutinefunction": "async ", "coroutinemethod": "async ",
    "abstractmethod": "abstractmethod ", "property": "property ", "decorator": "@",
    "decoratormethod": "@", "awaitablefunction": "awaitable ",
}
_NOINDEX = {"noindex", "no-index", "no-index-entry", "no-contents-entry"}
_ABBREVIATIONS = ("e.g.", "i.e.", "cf.", "vs.", "approx.", "resp.")


@dataclass
class _Entry:
    kind: str
    qualname: str
    passage: str
    answer: str


def question_for(kind: str, qualname: str) -> str:
    """The question template for an API directive kind."""
    if kind in _FUNCTION_KINDS:
        return f"What does {qualname}() do?"
    if kind == "class":
        return f"What is the class {qualname}?"
    if kind == "exception":
        return f"When is {qualname} raised?"
    return f"What is {qualname}?"


def _qualify(name: str, module: str | None, cls: str | None) -> tuple[str, str]:
    """(qualified name, name without module) following Sphinx's py-domain rules."""
    if cls:
        if name == cls or name.startswith(cls + "."):
            full = name
        else:
            full = f"{cls}.{name}"
    else:
        full = name
    if module and not (full == module or full.startswith(module + ".")):
        return f"{module}.{full}", full
    return full, full


def first_sentence(text: str) -> str | None:
    """First sentence of a one-line paragraph when it ends with a period, else None."""
    for match in re.finditer(r"\.(?=\s+[A-Z\"'(\[]|\s*$)", text):
        candidate = text[: match.end()]
        if candidate.endswith(_ABBREVIATIONS):
            continue
        return candidate
    return None


def _first_paragraph(desc: list[str]) -> list[str]:
    """First plain paragraph of a (dedented) description, skipping nested directives."""
    i = 0
    while i < len(desc):
        line = desc[i]
        if not line.strip():
            i += 1
        elif _EXPLICIT_RE.match(line):
            i = max(_block_end(desc, i + 1, _indent(line)), i + 1)
        else:
            j = i
            while j < len(desc) and desc[j].strip() and not _EXPLICIT_RE.match(desc[j]):
                j += 1
            return desc[i:j]
    return []


def _truncate(text: str, limit: int, keep: str) -> str | None:
    """Cut ``text`` to <= ``limit`` chars at a line or sentence boundary; None if ``keep`` is lost."""
    if len(text) > limit:
        cut = text[:limit]
        ends = [m.end() for m in re.finditer(r"[.!?:](?=\s)|\n", cut)]
        text = cut[: ends[-1]] if ends else cut
    text = text.rstrip()
    return text if keep in text else None


def _make_entry(kind: str, qualname: str, sig_lines: list[str], name: str, desc: list[str]) -> _Entry | None:
    """Build the gold passage and answer of one API directive, or None when unusable."""
    para = _first_paragraph(desc)
    if not para:
        return None
    answer = first_sentence(" ".join(clean_rst("\n".join(_dedent(para))).split()))
    if not answer or not ANSWER_CHARS[0] <= len(answer) <= ANSWER_CHARS[1]:
        return None
    first = sig_lines[0]
    start = first.find(name)
    signature = _SIG_PREFIX.get(kind, "") + qualname + first[start + len(name):]
    text = _finish([signature] + sig_lines[1:] + [""] + clean_rst("\n".join(desc)).split("\n"))
    passage = _truncate(text, MAX_PASSAGE_CHARS, answer)
    if passage is None or len(passage) < MIN_PASSAGE_CHARS:
        return None
    return _Entry(kind, qualname, passage, answer)


def _api_entries(raw_rst: str) -> list[_Entry]:
    """All usable API directives of one document, in order, first occurrence per name."""
    lines = _normalize(raw_rst)
    module: str | None = None
    classes: list[tuple[int, str]] = []
    entries: list[_Entry] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        indent = _indent(line)
        while classes and classes[-1][0] >= indent:
            classes.pop()
        mod = _MODULE_RE.match(line)
        if mod:
            module = None if mod.group(1) == "None" else mod.group(1)
            continue
        api = _API_RE.match(line)
        if not api:
            continue
        kind, signature = api.group(2), api.group(3).strip()
        name_match = _NAME_RE.match(signature)
        if not name_match:
            continue
        name = name_match.group(1).rstrip(".")
        qualname, full = _qualify(name, module, classes[-1][1] if classes else None)
        end = _block_end(lines, i + 1, indent)
        more, options, body_start = _split_header(lines, i + 1, end)
        if kind in _CLASS_KINDS:
            classes.append((indent, full))
        if qualname in seen or _NOINDEX & options.keys():
            continue
        desc = lines[body_start:end]
        nested = next((k for k, d in enumerate(desc) if _API_RE.match(d)), len(desc))
        entry = _make_entry(kind, qualname, [signature] + more, name, _dedent(desc[:nested]))
        if entry is not None:
            seen.add(qualname)
            entries.append(entry)
    return entries


def derive_qa(doc_id: str, raw_rst: str, num_passages: int = 3, seed: int = 0) -> list[QAExample]:
    """QA examples from the API directives of one reST document (see the module docstring)."""
    if num_passages < 1:
        raise ValueError(f"num_passages must be >= 1, got {num_passages}")
    entries = _api_entries(raw_rst)
    examples = []
    for entry in entries:
        rng = random.Random(seed ^ stable_hash(entry.qualname))
        others = sorted({e.passage for e in entries if e.passage != entry.passage})
        distractors = rng.sample(others, min(num_passages - 1, len(others)))
        candidates = [entry.passage] + distractors
        order = list(range(len(candidates)))
        rng.shuffle(order)
        examples.append(QAExample(
            question=question_for(entry.kind, entry.qualname),
            answer=entry.answer,
            passages=[candidates[k] for k in order],
            gold=order.index(0),
            doc_id=doc_id,
            name=entry.qualname,
        ))
    return examples
