"""Offline training and evaluation data, prepared by ``refrag-train prepare``.

* :mod:`.python_docs`: the Python documentation (Debian's ``python3-doc``), the training
  domain, and other Sphinx reST folders (the kernel's ``linux-doc``) as extra training prose;
* :mod:`.rst`: reST source -> plain text;
* :mod:`.qa`: RAG questions derived from the API descriptions;
* :mod:`.gcide`: English dictionary prose (Debian's ``dict-gcide``), a domain training never sees;
* :mod:`.records`: documents and QA examples, the held-out split, jsonl I/O.
"""

from .python_docs import EXCLUDED_DIRS, LINUX_DOC_EXCLUDED_DIRS, LINUX_DOC_SOURCES, find_python_docs, prepare
from .qa import derive_qa
from .records import Document, QAExample, is_heldout, load_documents, load_qa, read_jsonl, write_jsonl
from .rst import clean_rst

__all__ = [
    "Document", "EXCLUDED_DIRS", "LINUX_DOC_EXCLUDED_DIRS", "LINUX_DOC_SOURCES", "QAExample", "clean_rst",
    "derive_qa", "find_python_docs", "is_heldout", "load_documents", "load_qa", "prepare", "read_jsonl",
    "write_jsonl",
]
