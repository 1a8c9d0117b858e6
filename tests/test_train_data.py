"""Tests for refrag_train.data: reST cleaning, QA derivation, splitting, jsonl I/O and prepare()."""

import json
import time

import pytest

from refrag_train.data import (
    Document,
    QAExample,
    clean_rst,
    derive_qa,
    find_python_docs,
    is_heldout,
    load_documents,
    load_qa,
    prepare,
    read_jsonl,
    write_jsonl,
)

OS_PATH_RST = """\
:mod:`os.path` --- Common pathname manipulations
================================================

.. module:: os.path
   :synopsis: Operations on pathnames.

.. index:: single: path; operations

--------------

This module implements some useful functions on pathnames. To read or write
files see :func:`open`, and for accessing the filesystem see the :mod:`os`
module.

.. function:: join(path, *paths)

   Join one or more path segments intelligently.  The return value is the
   concatenation of *path* and all members of *\\*paths*, with exactly one
   directory separator following each non-empty part except the last.

   .. versionchanged:: 3.6
      Accepts a :term:`path-like object` for *path* and *paths*.


.. function:: basename(path)

   .. audit-event:: os.path.basename path os.path.basename

   Return the base name of pathname *path*.  This is the second element of the
   pair returned by passing *path* to the function :func:`split`.  Note that
   the result of this function is different from the Unix :program:`basename`
   program.


.. function:: chdir(path)
   :noindex:

   These functions are described in :ref:`os-file-dir`.


.. class:: PurePath(*pathsegments)

   A generic class that represents the system's path flavour (instantiating
   it creates either a PurePosixPath or a PureWindowsPath).  Each element of
   *pathsegments* can be a string or a path object.

   .. method:: is_absolute()

      Return whether the path is absolute or not.  A path is considered
      absolute if it has both a root and (if the flavour allows) a drive,
      as in ``PurePosixPath('/a/b')``.

.. exception:: PathError

   Raised when a path cannot be interpreted on the current platform, for
   example because it contains a NUL character or is far too long to handle.

.. data:: sep

   Short.
"""

PLAIN_RST = """\
Tutorial page
*************

Python is an easy to learn, powerful programming language. It has efficient
high-level data structures and a simple but effective approach to
object-oriented programming.

"""


def test_clean_rst_roles_literals_and_emphasis():
    text = clean_rst(
        "See :func:`os.path.join`, :meth:`~str.split`, :ref:`the tutorial <tut-intro>`\n"
        "and ``len(x)`` with *emphasis*, **strong** text, `Python <https://python.org>`_,\n"
        "`ref`_ and :pep:`8`."
    )
    assert text == (
        "See os.path.join, str.split, the tutorial and len(x) with emphasis, strong text, "
        "Python, ref and PEP 8."
    )


def test_clean_rst_headings_comments_and_targets():
    text = clean_rst(
        "=====\nTitle\n=====\n\nSection\n-------\n\n.. _my-label:\n\n.. This is a comment\n"
        "   that spans lines.\n\n..\n   empty comment body\n\n.. |sub| replace:: x\n\nBody text.\n"
    )
    assert text == "Title\n\nSection\n\nBody text."


def test_clean_rst_directives():
    text = clean_rst(
        ".. toctree::\n   :maxdepth: 2\n\n   intro\n\n"
        ".. index:: single: foo\n\n"
        ".. highlight:: python3\n\n"
        ".. sectionauthor:: Someone\n\n"
        ".. only:: html\n\n   Only-block text.\n\n"
        ".. function:: spam(eggs, *args)\n   :noindex:\n\n   Return spam.\n\n"
        ".. note::\n\n   Mind the gap.\n\n"
        ".. versionadded:: 3.8\n\n"
        ".. versionchanged:: 3.9\n   Added *bar*.\n\n"
        ".. deprecated:: 3.10\n\n"
        ".. code-block:: python\n   :emphasize-lines: 1\n\n      if x:\n          pass\n\n"
        "Example::\n\n    >>> 1 + 1\n    2\n\n"
        "Another example: ::\n\n    x = 1\n"
    )
    assert text.split("\n\n") == [
        "Only-block text.",
        "spam(eggs, *args)",
        "Return spam.",
        "Note: Mind the gap.",
        "New in version 3.8.",
        "Changed in version 3.9: Added bar.",
        "Deprecated since version 3.10.",
        "if x:\n    pass",
        "Example:",
        "    >>> 1 + 1\n    2",
        "Another example:",
        "    x = 1",
    ]


def test_clean_rst_reflow_and_blank_lines():
    src = "A wrapped   \nparagraph.\n\n\n\n* item one\n  continued\n* item two\n"
    assert clean_rst(src) == "A wrapped paragraph.\n\n* item one continued\n* item two"
    assert clean_rst(src, reflow=False) == "A wrapped\nparagraph.\n\n* item one\n  continued\n* item two"
    assert clean_rst(src) == clean_rst(src)


def test_derive_qa_names_questions_answers():
    examples = derive_qa("library/os.path", OS_PATH_RST)
    by_name = {e.name: e for e in examples}
    assert list(by_name) == [
        "os.path.join", "os.path.basename", "os.path.PurePath", "os.path.PurePath.is_absolute",
        "os.path.PathError",
    ]  # chdir is :noindex:, sep has no usable sentence
    join = by_name["os.path.join"]
    assert join.question == "What does os.path.join() do?"
    assert join.answer == "Join one or more path segments intelligently."
    assert by_name["os.path.basename"].answer == "Return the base name of pathname path."
    assert by_name["os.path.PurePath"].question == "What is the class os.path.PurePath?"
    assert by_name["os.path.PurePath.is_absolute"].question == "What does os.path.PurePath.is_absolute() do?"
    assert by_name["os.path.PathError"].question == "When is os.path.PathError raised?"
    golds = {e.passages[e.gold] for e in examples}
    for e in examples:
        assert e.doc_id == "library/os.path"
        assert len(e.passages) == 3 and len(set(e.passages)) == 3
        assert e.answer in e.passages[e.gold]
        assert e.name in e.passages[e.gold]
        assert all(p in golds for p in e.passages)  # distractors: gold passages of the same doc
        assert sum(e.answer in p for p in e.passages) == 1
    assert join.passages[join.gold].startswith("os.path.join(path, *paths)\n\nJoin one or more")
    # the class passage stops before its methods
    assert "is_absolute" not in by_name["os.path.PurePath"].passages[by_name["os.path.PurePath"].gold]


def test_derive_qa_deterministic_and_seeded():
    a = derive_qa("x", OS_PATH_RST, seed=3)
    assert a == derive_qa("x", OS_PATH_RST, seed=3)
    golds = [e.gold for e in a]
    others = [[e.gold for e in derive_qa("x", OS_PATH_RST, seed=s)] for s in range(8)]
    assert any(g != golds for g in others)
    few = derive_qa("x", OS_PATH_RST, num_passages=10)
    assert all(len(e.passages) == len(few) for e in few)
    one = derive_qa("x", OS_PATH_RST.split(".. function:: basename")[0])
    assert [len(e.passages) for e in one] == [1] and one[0].gold == 0


def test_derive_qa_class_prefixed_methods_and_currentmodule():
    rst = (
        ".. currentmodule:: None\n\n.. class:: str(object='')\n\n"
        "   Return a string version of object, or the empty string when nothing is given at all.\n\n"
        ".. method:: str.split(sep=None, maxsplit=-1)\n\n"
        "   Return a list of the words in the string, using sep as the delimiter string.\n"
    )
    names = [e.name for e in derive_qa("library/stdtypes", rst)]
    assert names == ["str", "str.split"]


def test_is_heldout_deterministic_fraction():
    ids = [f"library/mod{i}" for i in range(1000)]
    flags = [is_heldout(i, 0.2) for i in ids]
    assert flags == [is_heldout(i, 0.2) for i in ids]
    assert 150 <= sum(flags) <= 250
    assert [is_heldout(i, 0.2, seed=1) for i in ids] != flags
    # monotone in the fraction
    assert all(is_heldout(i, 0.5) for i, f in zip(ids, flags) if f)


def _write_source(root, n_api=6):
    (root / "library").mkdir(parents=True)
    (root / "tutorial").mkdir()
    (root / "whatsnew").mkdir()
    for k in range(n_api):
        (root / "library" / f"mod{k}.rst.txt").write_text(OS_PATH_RST.replace("os.path", f"mod{k}"))
        (root / "tutorial" / f"page{k}.rst.txt").write_text(PLAIN_RST * 3)
    (root / "whatsnew" / "3.11.rst.txt").write_text(PLAIN_RST * 5)
    (root / "license.rst.txt").write_text(PLAIN_RST * 5)
    (root / "tiny.rst.txt").write_text("Too short.\n")


def test_prepare_writes_consistent_splits(tmp_path):
    src = tmp_path / "src"
    _write_source(src)
    out = tmp_path / "out"
    manifest = prepare(out, source=src, heldout_fraction=0.3, seed=0, min_chars=200)
    train = load_documents(out / "train.jsonl")
    held = load_documents(out / "heldout.jsonl")
    assert train and held
    train_ids, held_ids = {d.id for d in train}, {d.id for d in held}
    assert not train_ids & held_ids
    assert all(is_heldout(i, 0.3) for i in held_ids) and not any(is_heldout(i, 0.3) for i in train_ids)
    assert "library/mod0" in train_ids | held_ids
    assert not any(i.startswith("whatsnew/") or i in ("license", "tiny") for i in train_ids | held_ids)
    assert manifest["skipped"] == {"excluded": 2, "too_short": 1}
    qa = {s: load_qa(out / f"qa_{s}.jsonl") for s in ("train", "heldout")}
    assert {e.doc_id for e in qa["train"]} <= train_ids
    assert {e.doc_id for e in qa["heldout"]} <= held_ids
    for split, docs in (("train", train), ("heldout", held)):
        stats = manifest["splits"][split]
        assert stats == {"docs": len(docs), "chars": sum(len(d.text) for d in docs), "qa": len(qa[split])}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert "sha256" in manifest["split_rule"] and manifest["qa_derivation"]
    assert not list(out.glob("*.tmp"))
    again = prepare(tmp_path / "out2", source=src, heldout_fraction=0.3, seed=0, min_chars=200)
    assert again["splits"] == manifest["splits"]
    assert (tmp_path / "out2" / "qa_train.jsonl").read_bytes() == (out / "qa_train.jsonl").read_bytes()


def test_prepare_excluded_dirs_and_max_train_chars(tmp_path):
    src = tmp_path / "src"
    _write_source(src)
    full = prepare(tmp_path / "full", source=src, heldout_fraction=0.3, min_chars=200,
                   excluded_dirs=("whatsnew", "tutorial"))
    ids = {d.id for s in ("train", "heldout") for d in load_documents(tmp_path / "full" / f"{s}.jsonl")}
    assert ids and not any(i.startswith("tutorial/") for i in ids)
    assert full["excluded_dirs"] == ["whatsnew", "tutorial"]
    budget = full["splits"]["train"]["chars"] // 2
    half = prepare(tmp_path / "half", source=src, heldout_fraction=0.3, min_chars=200,
                   excluded_dirs=("whatsnew", "tutorial"), max_train_chars=budget)
    train = load_documents(tmp_path / "half" / "train.jsonl")
    # Whole documents until the budget is reached: at least the budget, less than one more document.
    longest = max(len(d.text) for d in load_documents(tmp_path / "full" / "train.jsonl"))
    assert budget <= sum(len(d.text) for d in train) < budget + longest
    assert half["splits"]["heldout"] == full["splits"]["heldout"]  # the held-out split is untouched
    assert {e.doc_id for e in load_qa(tmp_path / "half" / "qa_train.jsonl")} <= {d.id for d in train}
    assert half["skipped"]["over_max_train_chars"] == full["splits"]["train"]["docs"] - len(train)


def test_prepare_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        prepare(tmp_path / "out", source=tmp_path, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        prepare(tmp_path / "out", source=tmp_path, heldout_fraction=0.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.rst.txt"):
        prepare(tmp_path / "out", source=tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        prepare(tmp_path / "out", source=tmp_path / "missing")


def test_find_python_docs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y python3-doc"):
        find_python_docs(tmp_path)


def test_find_python_docs_picks_largest(tmp_path):
    for name, n in (("python3.9", 1), ("python3.11", 3)):
        d = tmp_path / name / "html" / "_sources"
        d.mkdir(parents=True)
        for k in range(n):
            (d / f"f{k}.rst.txt").write_text("x")
    (tmp_path / "python3-doc").symlink_to(tmp_path / "python3.11")
    assert find_python_docs(tmp_path) == (tmp_path / "python3.11" / "html" / "_sources").resolve()


def test_jsonl_roundtrip_and_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])
    assert read_jsonl(path) == [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    assert load_documents(path) == [Document("a", "x"), Document("b", "y")]
    assert not (tmp_path / "docs.jsonl.tmp").exists()

    bad = tmp_path / "bad.jsonl"
    for text, error in [('{"text": "ok"}\n\n{"text": oops}\n', r"bad.jsonl:3: malformed JSON"),
                        ('{"text": "ok"}\n{"id": "no text"}\n', r"bad.jsonl:2: missing key 'text'"),
                        ('{"text": 3}\n', r"bad.jsonl:1: key 'text' should be str"),
                        ('["text"]\n', r"bad.jsonl:1: expected a JSON object"),
                        ("\n  \n", "no records")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            read_jsonl(bad)


def test_load_qa_checks_gold(tmp_path):
    path = tmp_path / "qa.jsonl"
    ex = QAExample("q?", "a.", ["p1 a.", "p2"], 0, "doc", "name")
    write_jsonl(path, [vars(ex)])
    assert load_qa(path) == [ex]
    write_jsonl(path, [dict(vars(ex), gold=2)])
    with pytest.raises(ValueError, match="qa.jsonl:1: gold index"):
        load_qa(path)


def test_prepare_real_python_docs(tmp_path):
    try:
        source = find_python_docs()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    start = time.perf_counter()
    manifest = prepare(tmp_path, source=source)
    elapsed = time.perf_counter() - start
    splits = manifest["splits"]
    assert splits["train"]["docs"] > 100 and splits["heldout"]["docs"] > 5
    assert splits["train"]["qa"] > 1000 and splits["heldout"]["qa"] > 50
    train_ids = {d["id"] for d in read_jsonl(tmp_path / "train.jsonl", ("id", "text"))}
    assert "library/os.path" in train_ids or "library/os.path" in {
        d["id"] for d in read_jsonl(tmp_path / "heldout.jsonl", ("id", "text"))
    }
    qa = load_qa(tmp_path / "qa_train.jsonl") + load_qa(tmp_path / "qa_heldout.jsonl")
    assert all(e.answer in e.passages[e.gold] for e in qa)
    assert any(e.name == "os.path.join" for e in qa)
    assert elapsed < 60


# Real GCIDE entries, verbatim in dictd's text format (a few from the "Ar" page).
GCIDE_ENTRIES = [
    ("Arriver", """Arriver \\Ar*riv"er\\, n.
   One who arrives.
   [1913 Webster]
"""),
    ("Arroba", """Arroba \\Ar*ro"ba\\, n. [Sp. and Pg., from Ar. arrub, ar-rubu, a
   fourth part.]
   1. A Spanish weight used in Mexico and South America = 25.36
      lbs. avoir.; also, an old Portuguese weight, used in
      Brazil = 32.38 lbs. avoir.
      [1913 Webster]
"""),
    ("Arrogance", """Arrogance \\Ar"ro*gance\\, n. [F., fr. L. arrogantia, fr.
   arrogans. See {Arrogant}.]
   The act or habit of arrogating, or making undue claims in an
   overbearing manner; that species of pride which consists in
   exorbitant claims of rank, dignity, estimation, or power.
   [1913 Webster]

         I hate not you for her proud arrogance.  --Shak.
   [1913 Webster]
"""),
    ("Arrogancy", """Arrogancy \\Ar"ro*gan*cy\\, n.
   Arrogance. --Shak.
   [1913 Webster]
"""),
    ("Arrogant", """Arrogant \\Ar"ro*gant\\, a. [F. arrogant, L. arrogans, p. pr. of
   arrogare. See {Arrogate}.]
   1. Making, or having the disposition to make, exorbitant
      claims of rank or estimation; giving one's self an undue
      degree of importance; assuming; haughty; -- applied to
      persons.
      [1913 Webster]
"""),
]


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = alphabet[n % 64] + out
        n //= 64
        if not n:
            return out


def _write_dictd(folder):
    import gzip

    text, index = b"", []
    for word, body in GCIDE_ENTRIES * 3:  # repeated: several pages; duplicate offsets are read once
        raw = (body + "\n").encode()
        index.append(f"{word}\t{_b64(len(text))}\t{_b64(len(raw))}")
        text += raw
    folder.mkdir()
    (folder / "gcide.index").write_text("00-database-url\tA\tB\n" + "\n".join(index) + "\n")
    with gzip.open(folder / "gcide.dict.dz", "wb") as f:
        f.write(text)


def test_gcide_entries_cleaned_and_definitions_found(tmp_path):
    from refrag_train.data.gcide import clean_entry, first_definition, read_entries

    _write_dictd(tmp_path / "dictd")
    entries = read_entries(tmp_path / "dictd")
    assert [w for w, _ in entries] == [w for w, _ in GCIDE_ENTRIES] * 3
    text = clean_entry(entries[2][1])
    assert "[1913 Webster]" not in text and "\\" not in text and "{" not in text
    assert text.startswith("Arrogance, n. [F., fr. L. arrogantia, fr. arrogans. See Arrogant.]")
    assert "I hate not you for her proud arrogance. --Shak." in text
    assert first_definition(text) == ("The act or habit of arrogating, or making undue claims in an "
                                      "overbearing manner; that species of pride which consists in exorbitant "
                                      "claims of rank, dignity, estimation, or power.")
    assert first_definition(clean_entry(entries[1][1])).startswith("A Spanish weight used in Mexico")
    assert first_definition(clean_entry(entries[3][1])) is None  # a bare cross-reference and a quotation


def test_prepare_gcide_writes_heldout_documents_and_questions(tmp_path):
    from refrag_train.data.gcide import prepare_gcide

    _write_dictd(tmp_path / "dictd")
    manifest = prepare_gcide(tmp_path / "out", tmp_path / "dictd", num_docs=2, min_chars=600, num_questions=10)
    docs = read_jsonl(tmp_path / "out" / "heldout.jsonl")
    qa = read_jsonl(tmp_path / "out" / "qa_heldout.jsonl", required=("question", "answer", "passages"))
    assert len(docs) == 2 and manifest["splits"]["heldout"]["docs"] == 2
    assert all("[1913 Webster]" not in d["text"] for d in docs)
    assert qa and all(q["question"].startswith('What does the word "') for q in qa)
    for q in qa:
        word = q["question"].split('"')[1]
        assert len(q["passages"]) == 3 and q["passages"][q["gold"]].startswith(word + ",")


FORTUNES = {  # the package's format: one fortune per block, a line holding "%" between blocks
    "literature": "A classic is something that everyone wants to have read\nand nobody wants to read.\n"
                  "\t\t-- Mark Twain, \"The Disappearance of Literature\"\n%\n"
                  "A horse!  A horse!  My kingdom for a horse!\n\t\t-- Wm. Shakespeare, \"Richard III\"\n%\n"
                  "\n%\nA light wife doth make a heavy husband.\n\t\t-- Wm. Shakespeare, \"The Merchant of Venice\"\n",
    "science": "Research is what I'm doing when I don't know what I'm doing.\n\t\t-- Wernher von Braun\n%\n",
    "definitions": "Bore, n.:\n\tA person who talks when you wish him to listen.\n\t\t-- Ambrose Bierce\n%\n",
}


def test_prepare_fortunes_groups_categories_and_splits_by_hash(tmp_path):
    from refrag_train.data.fortunes import prepare_fortunes, read_fortunes

    source = tmp_path / "fortunes"
    source.mkdir()
    for name, text in FORTUNES.items():
        (source / name).write_text(text)
        (source / f"{name}.dat").write_bytes(b"\x00\x00\x00\x02")  # strfile's index: not a category
        (source / f"{name}.u8").symlink_to(name)
    assert read_fortunes(source / "literature")[1] == ("A horse!  A horse!  My kingdom for a horse!\n"
                                                       "\t\t-- Wm. Shakespeare, \"Richard III\"")
    assert len(read_fortunes(source / "literature")) == 3  # the empty block is dropped
    manifest = prepare_fortunes(tmp_path / "out", source, min_chars=100, heldout_fraction=0.5)
    docs = read_jsonl(tmp_path / "out" / "train.jsonl", ("id", "text")) + \
        read_jsonl(tmp_path / "out" / "heldout.jsonl", ("id", "text"))
    # "definitions" is excluded (the dictionary is the held-out domain); 2 literature documents of >= 100 chars
    assert sorted(d["id"] for d in docs) == ["fortunes/literature/0", "fortunes/literature/1", "fortunes/science/0"]
    assert docs and all("Bierce" not in d["text"] and "%" not in d["text"] for d in docs)
    heldout = {d["id"] for d in read_jsonl(tmp_path / "out" / "heldout.jsonl", ("id", "text"))}
    assert heldout == {d["id"] for d in docs if is_heldout(d["id"], 0.5)}
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["heldout"]["docs"] == 3


AUSTEN = {  # the package's layout: a vector of hard-wrapped lines per novel, "" between paragraphs
    "emma": ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", "",
             "Emma Woodhouse, handsome, clever, and rich, with a comfortable home", "and happy disposition.",
             "", "She was the youngest of the two daughters.", "", "", "CHAPTER II", "",
             "Mr. Weston was a native of Highbury."],
    "persuasion": ["Persuasion", "", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall."],
}


def _write_r_lazy_load_db(folder, objects: dict) -> None:
    """R's lazy-load database as the package installs it: ``Rdata.rdb``, each object a 4-byte
    length and a zlib stream of R's XDR serialization, and ``Rdata.rdx`` (gzip), the index of
    (offset, length) by name; written with the ``rdata`` library the reader uses."""
    import gzip
    import struct
    import zlib

    import numpy as np
    import rdata

    def serialize(obj) -> bytes:
        return rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(obj))

    db, variables = b"", {}
    for name, lines in objects.items():
        raw = serialize(np.array(lines))
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        variables[name] = np.array([len(db), len(blob)], dtype=np.int32)
        db += blob
    (folder / "Rdata.rdb").write_bytes(db)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(serialize(
        {"variables": variables, "references": {}, "compressed": True})))


def test_prepare_austen_reads_the_r_database_into_chapters_of_paragraphs(tmp_path):
    from refrag_train.data.austen import prepare_austen, read_novels

    source = tmp_path / "janeaustenr"
    source.mkdir()
    _write_r_lazy_load_db(source, AUSTEN)
    assert read_novels(source) == AUSTEN
    manifest = prepare_austen(tmp_path / "out", source, heldout_fraction=0.5)
    docs = {d["id"]: d["text"] for split in ("train", "heldout")
            for d in read_jsonl(tmp_path / "out" / f"{split}.jsonl", ("id", "text"))}
    # front matter dropped; wrapped lines joined into paragraphs; a chapter keeps its heading
    assert docs == {
        "austen/emma/0": "CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich, with a comfortable home "
                         "and happy disposition.\n\nShe was the youngest of the two daughters.",
        "austen/emma/1": "CHAPTER II\n\nMr. Weston was a native of Highbury.",
        "austen/persuasion/0": "Chapter 1\n\nSir Walter Elliot, of Kellynch Hall.",
    }
    heldout = {d["id"] for d in read_jsonl(tmp_path / "out" / "heldout.jsonl", ("id", "text"))}
    assert heldout == {i for i in docs if is_heldout(i, 0.5)}
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["heldout"]["docs"] == 3
    with pytest.raises(FileNotFoundError, match="r-cran-janeaustenr"):
        read_novels(tmp_path / "missing")


BIBLE_OUTPUT = (  # the `bible -l1000 Gen1:1-Rev22:21` layout: a heading per chapter, numbered verses
    "\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
    "  2 And the earth was without form, and void.\n\nGenesis 2\n\n"
    "  1 Thus the heavens and the earth were finished.\n\n1 Samuel 1\n\n"
    "  1 Now there was a certain man of Ramathaimzophim.\n"
    "  2 And he had two wives; the name of the one was Hannah.\n"
)


def test_prepare_kjv_reads_chapters_as_prose_and_spreads_the_documents(tmp_path):
    from refrag_train.data.kjv import prepare_kjv, read_chapters

    chapters = read_chapters(BIBLE_OUTPUT)
    assert [h for h, _ in chapters] == ["Genesis 1", "Genesis 2", "1 Samuel 1"]  # "1 Samuel" is no verse
    assert chapters[0][1] == ("In the beginning God created the heaven and the earth. "
                              "And the earth was without form, and void.")
    (tmp_path / "bible.txt").write_text(BIBLE_OUTPUT)
    manifest = prepare_kjv(tmp_path / "out", tmp_path / "bible.txt", num_docs=2)
    docs = read_jsonl(tmp_path / "out" / "heldout.jsonl", ("id", "text"))
    assert [d["id"] for d in docs] == ["kjv/Genesis 1", "kjv/Genesis 2"]  # evenly spaced: chapters 0 and 1 of 3
    assert docs[0]["text"].startswith("Genesis 1\nIn the beginning") and manifest["splits"]["heldout"]["docs"] == 2
    with pytest.raises(ValueError, match="only 3 chapters, 4 wanted"):
        prepare_kjv(tmp_path / "out", tmp_path / "bible.txt", num_docs=4)


def test_prepare_without_its_source_is_a_clear_error_not_a_traceback(tmp_path):
    """``refrag-train prepare`` with a missing source or Debian package exits with its message."""
    from refrag_train.cli import main

    with pytest.raises(SystemExit, match="refrag-train prepare: error: no GCIDE database in .*dict-gcide"):
        main(["prepare", "--domain", "gcide", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="refrag-train prepare: error: .*No such file"):
        main(["prepare", "--domain", "kjv", "--source", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
