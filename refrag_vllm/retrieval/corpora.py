"""Reading corpora (jsonl line by line, errors with ``path:line``), and real English
text available offline on any machine with this package installed.

Docstrings of the Python standard library, then of the installed packages (torch,
transformers, vllm, ...), read with ``ast`` (nothing is imported or run),
whitespace-normalised and deduplicated, in a fixed order.  Used by the benchmarks,
the tests and the examples; the training data (``refrag-train prepare``) comes from
Debian's ``python3-doc`` instead.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path


class CorpusError(ValueError):
    """An input file cannot be used (missing, empty, a malformed line, conflicting ids)."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON)`` per non-blank line; a malformed line raises
    :class:`CorpusError` naming ``path:line``."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None


def docstring_texts(min_words: int = 20) -> Iterator[str]:
    """Docstrings of at least ``min_words`` words: stdlib, then site-packages."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    seen: set[str] = set()
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            rel = f.relative_to(root).parts
            if any(p in ("test", "tests", "site-packages", "idlelib") for p in rel[:-1]) and root == roots[0]:
                continue
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if not doc:
                        continue
                    doc = " ".join(doc.split())
                    if len(doc.split()) >= min_words and doc not in seen:
                        seen.add(doc)
                        yield doc


def sample_passages(n: int, tokens: int, tokenizer) -> list[str]:
    """Real English prose available offline: docstrings of Python's standard library."""
    import importlib

    texts = []
    for name in ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools",
                 "heapq", "http.client", "inspect", "json", "logging", "pathlib", "pickle", "re", "shutil",
                 "socket", "sqlite3", "string", "subprocess", "textwrap", "threading", "typing", "unittest",
                 "urllib.request", "uuid", "zipfile"):
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc.split()) > 60:
                ids = tokenizer(" ".join(doc.split()), add_special_tokens=False)["input_ids"]
                if len(ids) >= tokens:
                    texts.append(tokenizer.decode(ids[:tokens]))
            if len(texts) >= n:
                return texts
    return texts
