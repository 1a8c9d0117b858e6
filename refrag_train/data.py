"""Offline training data for REFRAG from the Python documentation.

Data
----
Debian's ``python3-doc`` package installs the reStructuredText sources of the
official Python documentation (``/usr/share/doc/python3.X/html/_sources``,
about 500 ``*.rst.txt`` files: tutorial, library reference, language
reference, HOWTOs, FAQs).  :func:`clean_rst` turns each file into readable
plain text (markup removed, directives rendered roughly the way Sphinx shows
them, prose paragraphs joined into single lines, code kept verbatim).  Change
logs (``whatsnew/``) and legal/boilerplate pages (``license``, ``copyright``,
``bugs``) are skipped, and so are documents shorter than ``min_chars``.  Each
document goes to the held-out split when a hash of ``"{seed}:{doc_id}"`` falls
below ``heldout_fraction`` (:func:`is_heldout`), so the split is stable when
files are added or removed.

QA derivation
-------------
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

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from tqdm import tqdm

__all__ = [
    "Document",
    "QAExample",
    "clean_rst",
    "derive_qa",
    "find_python_docs",
    "is_heldout",
    "load_documents",
    "load_qa",
    "main",
    "prepare",
    "read_jsonl",
    "write_jsonl",
]

DOCS_ROOT = "/usr/share/doc"
DOCS_GLOB = "python3*/html/_sources"
RST_SUFFIX = ".rst.txt"
EXCLUDED_DIRS = ("whatsnew",)
LINUX_DOC_SOURCES = "/usr/share/doc/linux-doc/html/_sources"
"""Debian's ``linux-doc``: the kernel's documentation, reST prose (an extra training domain)."""
LINUX_DOC_EXCLUDED_DIRS = ("translations",)
EXCLUDED_NAMES = ("license", "copyright", "bugs")
MAX_PASSAGE_CHARS = 1500
MIN_PASSAGE_CHARS = 100
ANSWER_CHARS = (20, 300)

SPLIT_RULE = (
    "A document is held out when int(sha256('{seed}:{doc_id}')[:8 bytes]) / 2**64 < heldout_fraction; "
    "QA examples follow the split of the document they come from."
)
QA_DERIVATION = (
    "One example per API directive (function, method, class, exception, attribute, data, decorator, "
    "classmethod, staticmethod, coroutine variants) with a qualified name from the current module and "
    "enclosing class. Question: template by kind; answer: first sentence of the description (20-300 chars, "
    "ending with a period); gold passage: rendered signature plus cleaned description (<= 1500 chars); "
    "distractors: gold passages of other entries of the same document, shuffled deterministically."
)


# --------------------------------------------------------------------------- data classes


@dataclass
class Document:
    """One cleaned documentation page; ``id`` is its path below the source dir without ``.rst.txt``."""

    id: str
    text: str


@dataclass
class QAExample:
    """A retrieval-augmented QA example; ``passages[gold]`` contains ``answer``."""

    question: str
    answer: str
    passages: list[str]
    gold: int
    doc_id: str
    name: str


# --------------------------------------------------------------------------- locating the docs


def _count_rst(directory: Path) -> int:
    return sum(1 for _ in directory.rglob(f"*{RST_SUFFIX}"))


def find_python_docs(root: str | Path = DOCS_ROOT) -> Path:
    """Return the ``_sources`` dir of the installed Python docs with the most ``*.rst.txt`` files."""
    counts: dict[Path, int] = {}
    for candidate in sorted(Path(root).glob(DOCS_GLOB)):
        real = candidate.resolve()
        if real.is_dir() and real not in counts:
            counts[real] = _count_rst(real)
    ranked = sorted((-n, str(p)) for p, n in counts.items() if n > 0)
    if not ranked:
        raise FileNotFoundError(
            f"no Python documentation sources found ({Path(root) / DOCS_GLOB}); install them with "
            "`apt-get update && apt-get install -y python3-doc` or pass --source DIR "
            "(a directory of *.rst.txt files)"
        )
    return Path(ranked[0][1])


# --------------------------------------------------------------------------- reST cleaning

_ADORNMENT_RE = re.compile(r"""^\s*([=\-`:'"~^_*+#<>.!$%&,/;?@\\|])\1{2,}\s*$""")
_TABLE_BORDER_RE = re.compile(r"^\s*(?:\+[-=+]+\+|=+(?: +=+)+|-+(?: +-+)+)\s*$")
_EXPLICIT_RE = re.compile(r"^( *)\.\.(?: +(.*))?$")
_DIRECTIVE_RE = re.compile(r"^([A-Za-z][\w:.-]*)::(?:\s+(.*))?$")
_FOOTNOTE_RE = re.compile(r"^\[([^\]]+)\]\s*(.*)$")
_OPTION_RE = re.compile(r"^:([\w-]+(?: [\w-]+)*):(?:\s+(.*))?$")
_LIST_ITEM_RE = re.compile(r"^(?:[-*+•]|#\.|\d+[.)]|\(\d+\)|[a-zA-Z][.)])\s+")
_FIELD_RE = re.compile(r"^:[\w .-]+:(?:\s|$)")

_LITERAL_RE = re.compile(r"``(?=\S)(.+?)(?<=\S)``(?!`)", re.S)
_ROLE_RE = re.compile(r"(?<![\w`]):(?P<role>[A-Za-z][\w:+.-]*?):`(?P<body>[^`]+)`(?!`)")
_LINK_RE = re.compile(r"`(?P<body>[^`]+)`__?(?!\w)")
_INTERPRETED_RE = re.compile(r"`(?P<body>[^`]+)`")
_FOOTREF_RE = re.compile(r" ?\[(?:#[\w-]*|\d+|\*)\]_")
_STRONG_RE = re.compile(r"(?<![\w*\\])\*\*(?=\S)(.+?)(?<=\S)\*\*(?![\w*])", re.S)
_EMPH_RE = re.compile(r"(?<![\w*\\])\*(?=[^\s*])([^*]+?)(?<=[^\s\\])\*(?![\w*])")
_PLACEHOLDER_RE = re.compile("\x00(\\d+)\x00")

_DROP = {
    "toctree", "index", "highlight", "sectionauthor", "moduleauthor", "codeauthor", "testsetup",
    "testcleanup", "module", "currentmodule", "py:module", "py:currentmodule", "program", "include",
    "literalinclude", "tabularcolumns", "contents", "image", "figure", "raw", "default-role",
    "default-domain", "miscnews", "limited-api-list", "meta", "role", "c:namespace", "c:namespace-push",
    "c:namespace-pop", "autoclass", "autofunction", "automodule", "digraph", "graphviz",
}
_CODE = {
    "code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "productionlist",
    "parsed-literal",
}
_UNWRAP = {"only", "container", "compound", "glossary", "list-table", "table", "epigraph", "centered"}
_ADMONITIONS = {
    "note": "Note", "warning": "Warning", "seealso": "See also", "important": "Important",
    "caution": "Caution", "tip": "Tip", "hint": "Hint", "attention": "Attention", "danger": "Danger",
    "error": "Error", "impl-detail": "CPython implementation detail", "availability": "Availability",
}
_VERSIONS = {
    "versionadded": "New in version {}",
    "versionchanged": "Changed in version {}",
    "deprecated": "Deprecated since version {}",
    "deprecated-removed": "Deprecated since version {}, will be removed in version {}",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(lines: list[str]) -> list[str]:
    widths = [_indent(line) for line in lines if line.strip()]
    cut = min(widths, default=0)
    return [line[cut:] if line.strip() else "" for line in lines]


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the last non-blank line, from ``start`` on, that is indented deeper than ``indent``."""
    end = start
    for j in range(start, len(lines)):
        if lines[j].strip():
            if _indent(lines[j]) <= indent:
                break
            end = j + 1
    return end


def _role_text(role: str, body: str) -> str:
    """Display text of an interpreted-text role or reference body."""
    body = body.strip()
    titled = re.match(r"(?s)^(.*\S)\s*<([^<>]+)>$", body)
    if titled:
        text = titled.group(1)
    else:
        text = body.lstrip("~!")
        if role in ("pep", "rfc"):
            text = f"{role.upper()} {text.split('#')[0]}"
        elif role in ("samp", "file"):
            text = re.sub(r"(?<!\\)[{}]", "", text)
    return " ".join(text.split())


def _inline(text: str) -> str:
    """Strip inline reST markup (roles, literals, emphasis, references)."""
    saved: list[str] = []

    def keep(value: str) -> str:
        saved.append(value)
        return f"\x00{len(saved) - 1}\x00"

    text = _LITERAL_RE.sub(lambda m: keep(" ".join(m.group(1).split())), text)
    text = _ROLE_RE.sub(lambda m: keep(_role_text(m.group("role"), m.group("body"))), text)
    text = _LINK_RE.sub(lambda m: keep(_role_text("", m.group("body"))), text)
    text = _INTERPRETED_RE.sub(lambda m: keep(_role_text("", m.group("body"))), text)
    text = _FOOTREF_RE.sub("", text)
    text = _STRONG_RE.sub(r"\1", text)
    text = _EMPH_RE.sub(r"\1", text)
    text = re.sub(r"\\ ", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    while "\x00" in text:
        text = _PLACEHOLDER_RE.sub(lambda m: saved[int(m.group(1))], text)
    return text


def _reflow(lines: list[str]) -> list[str]:
    """Join wrapped prose lines; list items, fields and indentation changes start a new line."""
    out: list[str] = []
    cont = -1
    for line in lines:
        stripped = line.strip()
        ind = _indent(line)
        stripped = " ".join(stripped.split())
        if out and ind == cont and not _LIST_ITEM_RE.match(stripped) and not _FIELD_RE.match(stripped):
            out[-1] += " " + stripped
            continue
        out.append(" " * ind + stripped)
        item = _LIST_ITEM_RE.match(stripped)
        cont = ind + (item.end() if item else 0)
    return out


def _strip_double_colon(lines: list[str]) -> list[str]:
    """Apply the reST rule for a paragraph that ends with ``::``."""
    last = lines[-1].rstrip()
    if last.strip() == "::":
        return lines[:-1]
    if last.endswith(" ::"):
        return lines[:-1] + [last[:-3].rstrip()]
    return lines[:-1] + [last[:-1]]


def _paragraph(lines: list[str], reflow: bool) -> list[str]:
    """Clean one paragraph (no blank lines, no explicit markup)."""
    if lines[0].lstrip().startswith(">>>"):
        return [line.rstrip() for line in lines]
    is_table = any(_TABLE_BORDER_RE.match(line) for line in lines)
    kept = [line for line in lines if not (_ADORNMENT_RE.match(line) or _TABLE_BORDER_RE.match(line))]
    if not kept:
        return []
    kept = _inline("\n".join(kept)).split("\n")
    if reflow and not is_table:
        kept = _reflow(kept)
    if kept[-1].rstrip().endswith("::"):
        kept = _strip_double_colon(kept)
    return kept


def _labelled(label: str, content: list[str], sep: str = ": ") -> list[str]:
    """Prefix ``label`` to cleaned content, on the first line when it is prose."""
    body = list(content)
    while body and not body[0].strip():
        body.pop(0)
    if not body:
        return [label + "."]
    first = body[0]
    prose = first[:1].isalnum() and not first.startswith(">>>") and not _LIST_ITEM_RE.match(first)
    if prose:
        return [f"{label}{sep}{first}"] + body[1:]
    return [label + ":"] + body


def _directive(
    name: str, arg_lines: list[str], body: list[str], reflow: bool
) -> list[str]:
    """Render one directive (header arguments already split from its dedented body)."""
    arg = " ".join(arg_lines)
    if name in _DROP:
        return []
    if name in _CODE:
        code = (arg_lines[1:] if name == "productionlist" else []) + body
        code = _dedent(code)
        return [""] + [line.rstrip() for line in code] + [""]
    if name == "audit-event":
        parts = arg.split()
        event = parts[0] if parts else "?"
        args = [a for a in (parts[1].strip('"').split(",") if len(parts) > 1 else []) if a]
        if not args:
            return [f"Raises an auditing event {event}."]
        noun = "argument" if len(args) == 1 else "arguments"
        return [f"Raises an auditing event {event} with {noun} {', '.join(args)}."]
    content = [arg] if arg else []
    if name in _VERSIONS:
        words = arg.split(None, 2 if name == "deprecated-removed" else 1)
        nver = 2 if name == "deprecated-removed" else 1
        versions = (words[:nver] + ["?", "?"])[:nver]
        label = _VERSIONS[name].format(*versions)
        rest = " ".join(words[nver:])
        content = ([rest] if rest else []) + ([""] + body if body else [])
        return _labelled(label, _clean_lines(content, reflow))
    if name in _ADMONITIONS or name == "admonition":
        label = _ADMONITIONS.get(name) or arg or "Note"
        content = ([] if name == "admonition" else content) + ([""] + body if body else [])
        return _labelled(label, _clean_lines(content, reflow))
    if name in _UNWRAP:
        return _clean_lines(body, reflow)
    # Generic (API signatures, rubric, topic, cmdoption, envvar, ...): header lines then content.
    return [line.strip() for line in arg_lines] + [""] + _clean_lines(body, reflow)


def _split_header(lines: list[str], start: int, end: int) -> tuple[list[str], dict[str, str], int]:
    """Continuation lines and ``:options:`` right after a directive line; returns (args, options, body_start)."""
    args: list[str] = []
    options: dict[str, str] = {}
    j = start
    while j < end and lines[j].strip():
        stripped = lines[j].strip()
        option = _OPTION_RE.match(stripped)
        if option:
            options[option.group(1)] = (option.group(2) or "").strip()
        else:
            args.append(stripped)
        j += 1
    return args, options, j


def _explicit(lines: list[str], i: int, reflow: bool) -> tuple[list[str], int]:
    """Render the explicit-markup block starting at line ``i``; returns (lines, next index)."""
    match = _EXPLICIT_RE.match(lines[i])
    assert match is not None
    indent, rest = len(match.group(1)), (match.group(2) or "").strip()
    end = _block_end(lines, i + 1, indent)
    footnote = _FOOTNOTE_RE.match(rest)
    directive = _DIRECTIVE_RE.match(rest)
    if footnote and not rest.startswith("|"):
        body = [footnote.group(2)] + _dedent(lines[i + 1:end])
        rendered = _labelled(f"[{footnote.group(1)}]", _clean_lines(body, reflow), sep=" ")
    elif directive and not rest.startswith(("|", "_")):
        head = [directive.group(2).strip()] if directive.group(2) else []
        more, _options, body_start = _split_header(lines, i + 1, end)
        body = _dedent(lines[body_start:end])
        rendered = _directive(directive.group(1).lower(), head + more, body, reflow)
    else:  # comment, hyperlink target, substitution definition
        rendered = []
    pad = " " * indent
    return [""] + [pad + line if line.strip() else "" for line in rendered] + [""], end


def _clean_lines(lines: list[str], reflow: bool) -> list[str]:
    """Clean a block of reST lines (recursive through directive bodies)."""
    out: list[str] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip():
            out.append("")
            i += 1
            continue
        if _EXPLICIT_RE.match(line):
            rendered, i = _explicit(lines, i, reflow)
            out.extend(rendered)
            continue
        j = i + 1
        while j < n and lines[j].strip() and not _EXPLICIT_RE.match(lines[j]):
            j += 1
        para = lines[i:j]
        out.extend(_paragraph(para, reflow))
        i = j
        if para[-1].rstrip().endswith("::") and not para[0].lstrip().startswith(">>>"):
            i = _literal_block(lines, i, _content_indent(para[-1]), out)
    return out


def _content_indent(line: str) -> int:
    """Indentation of the text of ``line`` (after a list marker, if any)."""
    item = _LIST_ITEM_RE.match(line.lstrip())
    return _indent(line) + (item.end() if item else 0)


def _literal_block(lines: list[str], i: int, indent: int, out: list[str]) -> int:
    """Copy the indented literal block after a ``::`` paragraph verbatim; returns the next index."""
    k = i
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k >= len(lines) or _indent(lines[k]) <= indent:
        return i
    end = _block_end(lines, k, indent)
    out.append("")
    out.extend(line.rstrip() for line in lines[k:end])
    out.append("")
    return end


def _finish(lines: Iterable[str]) -> str:
    """Strip trailing spaces, collapse blank-line runs and trim the ends."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def _normalize(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8).split("\n")


def clean_rst(text: str, reflow: bool = True) -> str:
    """reST source -> readable plain text (prose + code); ``reflow`` joins wrapped prose lines."""
    return _finish(_clean_lines(_normalize(text), reflow))


# --------------------------------------------------------------------------- QA derivation

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


def stable_hash(text: str) -> int:
    """64-bit hash of ``text`` that does not change between processes."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


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


# --------------------------------------------------------------------------- splitting and I/O


def is_heldout(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split: sha256 of ``"{seed}:{doc_id}"`` mapped to [0, 1) is below ``fraction``."""
    return stable_hash(f"{seed}:{doc_id}") / 2**64 < fraction


_FIELD_TYPES: dict[str, type] = {
    "id": str, "text": str, "question": str, "answer": str, "passages": list, "gold": int,
    "doc_id": str, "name": str,
}
QA_FIELDS = ("question", "answer", "passages", "gold", "doc_id", "name")


def _check_record(record: Any, required: tuple[str, ...]) -> str | None:
    """Why a parsed jsonl record is invalid, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in required:
        if key not in record:
            return f"missing key {key!r}"
        want = _FIELD_TYPES.get(key)
        value = record[key]
        if want is not None and (not isinstance(value, want) or isinstance(value, bool)):
            return f"key {key!r} should be {want.__name__}, got {type(value).__name__}"
    return None


def _iter_jsonl(path: str | Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    from refrag_vllm.retrieval.corpora import iter_jsonl

    for lineno, record in iter_jsonl(path):
        problem = _check_record(record, required)
        if problem:
            raise ValueError(f"{path}:{lineno}: {problem}")
        yield lineno, record


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("text",)) -> list[dict]:
    """Parse a jsonl file; errors name ``path:line``; an empty file is an error."""
    records = [record for _, record in _iter_jsonl(path, required)]
    if not records:
        raise ValueError(f"{path}: no records (empty jsonl file)")
    return records


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (``path.tmp`` then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_documents(path: str | Path) -> list[Document]:
    """Documents from a ``train.jsonl`` / ``heldout.jsonl`` file."""
    return [Document(r["id"], r["text"]) for r in read_jsonl(path, ("id", "text"))]


def load_qa(path: str | Path) -> list[QAExample]:
    """QA examples from a ``qa_*.jsonl`` file, checking that ``gold`` indexes ``passages``."""
    examples = []
    for lineno, r in _iter_jsonl(path, QA_FIELDS):
        if not 0 <= r["gold"] < len(r["passages"]) or not all(isinstance(p, str) for p in r["passages"]):
            raise ValueError(f"{path}:{lineno}: gold index {r['gold']} / passages do not fit")
        examples.append(QAExample(**{k: r[k] for k in QA_FIELDS}))
    if not examples:
        raise ValueError(f"{path}: no records (empty jsonl file)")
    return examples


# --------------------------------------------------------------------------- prepare


def doc_id_for(path: Path, source: Path) -> str:
    """``library/os.path`` for ``<source>/library/os.path.rst.txt``."""
    rel = path.relative_to(source).as_posix()
    return rel[: -len(RST_SUFFIX)] if rel.endswith(RST_SUFFIX) else rel


def is_excluded(doc_id: str, excluded_dirs: tuple[str, ...] = EXCLUDED_DIRS) -> bool:
    """Change logs, translations and legal/boilerplate pages are not useful prose."""
    parts = doc_id.split("/")
    return parts[0] in excluded_dirs or parts[-1] in EXCLUDED_NAMES


def _split_stats(docs: list[Document], qa: list[QAExample]) -> dict[str, int]:
    return {"docs": len(docs), "chars": sum(len(d.text) for d in docs), "qa": len(qa)}


def prepare(
    out_dir: str | Path,
    source: str | Path | None = None,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 2000,
    num_passages: int = 3,
    excluded_dirs: tuple[str, ...] = EXCLUDED_DIRS,
    max_train_chars: int | None = None,
) -> dict:
    """Build train/held-out documents and QA sets from a folder of Sphinx reST sources
    (default: the Python docs); returns the manifest.

    ``max_train_chars`` keeps the training split to about that many characters: documents
    are taken in the order of their stable hash, a deterministic spread over the folder."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    src = find_python_docs() if source is None else Path(source)
    if not src.is_dir():
        raise FileNotFoundError(f"source directory {src} does not exist")
    src = src.resolve()
    files = sorted(src.rglob(f"*{RST_SUFFIX}"))
    if not files:
        raise ValueError(f"{src}: no *{RST_SUFFIX} files")
    docs: dict[str, list[Document]] = {"train": [], "heldout": []}
    qa: dict[str, list[QAExample]] = {"train": [], "heldout": []}
    skipped = {"excluded": 0, "too_short": 0}
    for path in tqdm(files, desc=f"reST sources in {src.name}", unit="doc", mininterval=1.0):
        doc_id = doc_id_for(path, src)
        if is_excluded(doc_id, excluded_dirs):
            skipped["excluded"] += 1
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = clean_rst(raw)
        if len(text) < min_chars:
            skipped["too_short"] += 1
            continue
        split = "heldout" if is_heldout(doc_id, heldout_fraction, seed) else "train"
        docs[split].append(Document(doc_id, text))
        qa[split].extend(derive_qa(doc_id, raw, num_passages=num_passages, seed=seed))
    if not docs["train"] and not docs["heldout"]:
        raise ValueError(f"{src}: no documents left after filtering (min_chars={min_chars})")
    if max_train_chars is not None:
        kept, total = [], 0
        for doc in sorted(docs["train"], key=lambda d: stable_hash(f"{seed}:take:{d.id}")):
            if total >= max_train_chars:
                break
            kept.append(doc)
            total += len(doc.text)
        skipped["over_max_train_chars"] = len(docs["train"]) - len(kept)
        kept_ids = {d.id for d in kept}
        docs["train"] = [d for d in docs["train"] if d.id in kept_ids]
        qa["train"] = [e for e in qa["train"] if e.doc_id in kept_ids]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files_out = {}
    for split in ("train", "heldout"):
        files_out[split] = f"{split}.jsonl"
        files_out[f"qa_{split}"] = f"qa_{split}.jsonl"
        write_jsonl(out / files_out[split], (asdict(d) for d in docs[split]))
        write_jsonl(out / files_out[f"qa_{split}"], (asdict(e) for e in qa[split]))
    manifest = {
        "source": str(src),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "min_chars": min_chars,
        "num_passages": num_passages,
        "excluded_dirs": list(excluded_dirs),
        "max_train_chars": max_train_chars,
        "files": files_out,
        "splits": {s: _split_stats(docs[s], qa[s]) for s in ("train", "heldout")},
        "skipped": skipped,
        "split_rule": SPLIT_RULE,
        "qa_derivation": QA_DERIVATION,
    }
    _write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m refrag_train.data --out DIR [--source DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--source", default=None, help="directory of *.rst.txt files (default: python3-doc)")
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-chars", type=int, default=2000)
    parser.add_argument("--num-passages", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.out, args.source, args.heldout_fraction, args.seed, args.min_chars,
                           args.num_passages)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **manifest["splits"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
