"""The passage index: FAISS retrieval on real text, the REFRAG cache, appends, resumes and bad input.

Retrieval uses the shipped all-MiniLM-L6-v2 (sentence-transformers, offline); the cache
is built for the tiny random checkpoint of the other tests.
"""

import json

import numpy as np
import pytest
import torch

from real_text import question_for, real_passages
from refrag_vllm.retrieval.index import (CHUNKS, META, PASSAGES, CacheMismatchError, CorpusError, IndexWriter,
                               PassageIndex, build_index, content_id, read_corpus)

RETRIEVAL_TOP1_THRESHOLD = 0.8
"""A sentence taken from a passage must retrieve that passage first in >= 80% of cases."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(real_passages())))
    return path


@pytest.fixture(scope="module")
def index(corpus, tiny_ckpt, tmp_path_factory):
    return build_index(corpus, tmp_path_factory.mktemp("idx") / "index", tiny_ckpt, batch_size=32, progress=False)


def test_retrieval_top1_on_real_text(index):
    from refrag_vllm.retrieval.index import Retriever

    questions, expected = [], []
    for row, rec in enumerate(index.records):
        questions.append(question_for(rec["text"]))
        expected.append(row)
    hits = index.search(Retriever.from_spec(index.meta["retriever"]).embed(questions), 1)
    accuracy = np.mean([h[0].row == e for h, e in zip(hits, expected)])
    assert accuracy >= RETRIEVAL_TOP1_THRESHOLD, accuracy


def test_cache_rows_are_the_checkpoints_projection(index, reference, builder):
    from refrag_vllm import CompressedChunks
    from refrag_vllm.prompt import chunk_text

    for row in (0, 7, len(index) - 1):
        text = index.records[row]["text"]
        texts = [chunk_text(builder.tokenizer, c) for c in builder.chunk_passage(text)]
        with torch.no_grad():
            expected = reference.project_items([CompressedChunks.from_texts(texts)])[0].float()
        cached = index.chunk_embeds(row)
        assert cached.shape == expected.shape == (len(texts), reference.config.hidden_size)
        torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)


def test_appending_gives_the_same_index_as_one_build(corpus, index, tiny_ckpt, tmp_path):
    lines = corpus.read_text().splitlines(keepends=True)
    first = tmp_path / "first.jsonl"
    first.write_text("".join(lines[:50]))
    out = tmp_path / "index"
    assert len(build_index(first, out, tiny_ckpt, batch_size=32, progress=False)) == 50
    again = build_index(corpus, out, tiny_ckpt, batch_size=32, progress=False)  # adds the other 70
    assert [r["id"] for r in again.records] == [r["id"] for r in index.records]
    # The retriever runs in bfloat16: a passage padded to another batch's width rounds differently.
    np.testing.assert_allclose(again.vectors(), index.vectors(), atol=2e-3)
    for row in (3, 60, 119):
        torch.testing.assert_close(again.chunk_embeds(row), index.chunk_embeds(row), atol=1e-5, rtol=1e-5)
    assert len(build_index(corpus, out, tiny_ckpt, progress=False)) == len(index)  # nothing new: no-op


def test_an_index_grows_only_with_the_retriever_it_was_built_with(index, tiny_ckpt):
    """Passage vectors of one index come from one retriever setting: the model and the word
    pieces it reads are recorded, and another setting may not append."""
    from refrag_vllm.retrieval.index import RETRIEVER_MAX_TOKENS, cache_identity, retriever_spec

    assert index.meta["retriever"]["max_tokens"] == RETRIEVER_MAX_TOKENS
    with pytest.raises(ValueError, match="built with retriever .*'max_tokens': 128.*not .*'max_tokens': 256"):
        IndexWriter(index.path, cache_identity(tiny_ckpt), retriever_spec(max_tokens=256))
    IndexWriter(index.path, cache_identity(tiny_ckpt), retriever_spec())  # the same setting may
    with pytest.raises(ValueError, match="at least one word piece"):
        retriever_spec(max_tokens=0)


def test_an_interrupted_build_resumes(corpus, index, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "index"
    real_add = IndexWriter.add
    calls = []

    def add_then_die(self, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        real_add(self, *args)

    monkeypatch.setattr(IndexWriter, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(corpus, out, tiny_ckpt, batch_size=32, progress=False)
    monkeypatch.setattr(IndexWriter, "add", real_add)
    partial = PassageIndex.open(out)
    assert len(partial) == 64
    # bytes a crash left past the commit point are ignored, then overwritten
    with open(out / CHUNKS, "ab") as f:
        f.write(b"\x00" * 1000)
    with open(out / PASSAGES, "a") as f:
        f.write('{"id": "torn li')
    assert len(PassageIndex.open(out)) == 64
    done = build_index(corpus, out, tiny_ckpt, batch_size=32, progress=False)
    assert [r["id"] for r in done.records] == [r["id"] for r in index.records]
    torch.testing.assert_close(done.chunk_embeds(119), index.chunk_embeds(119))


def test_a_build_that_never_committed_starts_clean(corpus, tiny_ckpt, tmp_path):
    out = tmp_path / "index"
    out.mkdir()
    (out / CHUNKS).write_bytes(b"junk")
    (out / PASSAGES).write_text("junk\n")
    assert len(build_index(corpus, out, tiny_ckpt, progress=False)) == 120


def test_bad_corpora_are_reported_and_nothing_is_written(tiny_ckpt, tmp_path):
    out = tmp_path / "index"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CorpusError, match="no passages"):
        build_index(empty, out, tiny_ckpt, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:3: malformed JSON"):
        build_index(bad, out, tiny_ckpt, progress=False)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r":2: expected an object"):
        read_corpus(no_text)
    clash = tmp_path / "clash.jsonl"
    clash.write_text('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n')
    with pytest.raises(CorpusError, match="two different texts"):
        read_corpus(clash)
    csv = tmp_path / "x.csv"
    csv.write_text("a")
    with pytest.raises(CorpusError, match=r"\.txt .* or \.jsonl"):
        read_corpus(csv)
    assert not out.exists()


def test_txt_corpus_ids_are_content_hashes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first passage\n\nsecond passage\nfirst passage\n")
    recs = read_corpus(path)
    assert [r.text for r in recs] == ["first passage", "second passage"]
    assert recs[0].id == content_id("first passage")


def test_missing_index_and_wrong_checkpoint_or_k(index, tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an index"):
        PassageIndex.open(tmp_path / "nowhere")
    from tiny_models import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", k=16, seed=1)
    with pytest.raises(CacheMismatchError, match="built for checkpoint"):
        index.check_model(other)
    other_k = make_tiny_checkpoint(tmp_path / "k8", k=8, seed=0)
    with pytest.raises(CacheMismatchError, match="k=16.*k=8"):
        index.check_model(other_k)
    index.check_model(tiny_ckpt)
    meta = json.loads((index.path / META).read_text())
    assert meta["cache"]["k"] == 16 and meta["num_passages"] == 120


def test_index_rate_benchmark_builds_the_index_it_times(tiny_ckpt, tmp_path):
    """The --quick profile of benchmarks.index_rate: both arms over the same chunks, a full
    index (checked inside), well-formed files, and the ratio merged into a summary.
    Timings are not asserted (benchmarks measure; tests check behaviour)."""
    from benchmarks.index_rate import main

    summary = tmp_path / "results.json"
    summary.write_text(json.dumps({"summary": {"kv_bytes_per_chunk": 1}}))
    passages = real_passages()[:12]
    qa = tmp_path / "qa.jsonl"  # each question's answer is in passages[gold]
    qa.write_text("".join(json.dumps({"question": question_for(p), "passages": [passages[i - 1], p], "gold": 1}) + "\n"
                          for i, p in enumerate(passages)))
    main(["--quick", "--model", str(tiny_ckpt), "--out", str(tmp_path / "out"), "--summary", str(summary),
          "--qa", str(qa)])
    result = json.loads((tmp_path / "out" / "index_rate.json").read_text())
    assert result["passages"] == 24 and result["chunks"] >= 24 * 64 // 16
    assert [r["arm"] for r in result["rows"]] == ["index", "encoder + projector", "retriever (128 tokens)",
                                                   "retriever, 256 tokens", "retriever, float32 (128 tokens)"]
    assert [(h["max_tokens"], h["questions"], h["passages"]) for h in result["retrieval_hits"]] == [
        (128, 12, 12), (256, 12, 12)]
    assert all(h["hit@1"] >= RETRIEVAL_TOP1_THRESHOLD and h["hit@3"] >= h["hit@1"] for h in result["retrieval_hits"])
    assert all(r["seconds"] > 0 and r["chunks_per_s"] > 0 for r in result["rows"])
    from refrag_vllm.engine import serving_dtype

    assert result["retriever_dtype"] == serving_dtype() and result["retriever_cosine_to_float32"]["min"] > 0.99
    assert json.loads(summary.read_text())["summary"] == {
        "kv_bytes_per_chunk": 1, "index_vs_encoder_rate": result["index_vs_encoder_rate"]}
    assert "index_vs_encoder_rate" in (tmp_path / "out" / "index_rate.md").read_text()
