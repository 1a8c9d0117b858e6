"""Real prose for the retrieval tests: docstrings of the Python standard library (offline)."""

import re


def sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 8]


def real_passages(n=120, stride=7):
    """Docstrings of the Python standard library (real prose, offline), 40-120 words each:
    every ``stride``-th one, so that many modules are represented, and none sharing a
    sentence with another (each question names one right passage)."""
    from refrag_vllm.retrieval.corpora import docstring_texts

    out, seen, eligible = [], set(), 0
    for doc in docstring_texts(min_words=40):
        sents = sentences(doc)
        if len(doc.split()) <= 120 and len(sents) >= 2 and not seen & set(sents):
            eligible += 1
            if eligible % stride == 0:
                out.append(doc)
                seen.update(sents)
        if len(out) == n:
            return out
    raise AssertionError("not enough docstrings")


def question_for(text):
    """The passage's longest sentence after the first (docstrings often open alike)."""
    return max(sentences(text)[1:], key=len)
