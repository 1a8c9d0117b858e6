"""Real English text available offline on any machine with this package installed.

Docstrings of the Python standard library, then of the installed packages (torch,
transformers, vllm, ...), read with ``ast`` (nothing is imported or run),
whitespace-normalised and deduplicated, in a fixed order.  Used by the benchmarks,
the tests and the examples; the training data (``refrag-train prepare``) comes from
Debian's ``python3-doc`` instead.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path


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
