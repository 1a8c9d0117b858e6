"""RefragRAG on a real vLLM engine: cached chunk vectors == the encoder in the engine; the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import LOGPROB_ATOL, greedy, make_llm, shutdown_llm

pytestmark = [pytest.mark.slow, pytest.mark.engine]

QUESTIONS = ["How do I read a file line by line?", "What does the decoder return?",
             "Which exception is raised on a timeout?"]


@pytest.fixture(scope="module")
def index(tiny_ckpt, tmp_path_factory):
    from real_text import real_passages

    from refrag_vllm.retrieval.index import build_index

    corpus = tmp_path_factory.mktemp("rag") / "docs.txt"
    corpus.write_text("\n".join(real_passages(40)) + "\n")
    return build_index(corpus, corpus.parent / "index", tiny_ckpt, progress=False)


@pytest.fixture(scope="module")
def rag(index, tiny_ckpt):
    from refrag_vllm.retrieval.rag import RefragRAG

    llm = make_llm(tiny_ckpt)
    yield RefragRAG(index, llm)
    shutdown_llm(llm)


def _run(rag, mode):
    hits = rag.retrieve(QUESTIONS, top_k=3)
    return [rag.prompt(q, h, mode) for q, h in zip(QUESTIONS, hits)], hits


def test_cached_vectors_give_the_engine_output_of_the_in_engine_encoder(rag):
    cached_prompts, hits = _run(rag, "refrag-cached")
    text_prompts, _ = _run(rag, "refrag")
    assert all(p["multi_modal_data"]["refrag_chunk"][0].kind == "projected" for p in cached_prompts)
    assert all(p["multi_modal_data"]["refrag_chunk"][0].kind == "text" for p in text_prompts)
    for a, b in zip(greedy(rag.llm, cached_prompts, 12), greedy(rag.llm, text_prompts, 12)):
        assert a[0] == b[0]
        assert max(abs(x - y) for x, y in zip(a[1], b[1])) < LOGPROB_ATOL


def test_generate_in_each_mode(rag):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {m: rag.generate(QUESTIONS, top_k=3, mode=m, sampling_params=params)
               for m in ("refrag-cached", "refrag", "vanilla")}
    for m, answers in results.items():
        assert [a.question for a in answers] == QUESTIONS
        assert all(len(a.passages) == 3 and len(a.token_ids) == 6 for a in answers)
    # same passages, k=16: compressed prompts take far fewer decoder positions
    for r, v in zip(results["refrag-cached"], results["vanilla"]):
        assert [h.id for h in r.passages] == [h.id for h in v.passages]
        assert r.positions * 4 < v.positions
    assert [a.token_ids for a in results["refrag-cached"]] == [a.token_ids for a in results["refrag"]]


def test_a_cache_for_another_checkpoint_is_refused(index, tmp_path):
    from tiny_models import make_tiny_checkpoint

    from refrag_vllm.retrieval.index import CacheMismatchError
    from refrag_vllm.retrieval.rag import RefragRAG

    other = make_tiny_checkpoint(tmp_path / "other", k=16, seed=3)
    with pytest.raises(CacheMismatchError):
        RefragRAG(index, model_dir=other)


def _cli(*args, **kw):
    return subprocess.run([str(Path(sys.executable).parent / "refrag-vllm"), *args], capture_output=True,
                          text=True, timeout=600, **kw)


def test_cli_index_and_ask(index, tiny_ckpt, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": r["text"]}) + "\n"
                              for i, r in enumerate(index.records[:10])))
    out = tmp_path / "index"
    done = _cli("index", "--corpus", str(corpus), "--out", str(out), "--model", str(tiny_ckpt))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 passages" in done.stdout
    asked = _cli("ask", "--index", str(out), "--model", str(tiny_ckpt), "--max-tokens", "4", QUESTIONS[0],
                 env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert asked.returncode == 0, asked.stderr[-3000:]
    lines = asked.stdout.splitlines()
    assert f"Q: {QUESTIONS[0]}" in lines and any(line.startswith("A: ") for line in lines)
    used = lines[lines.index(next(x for x in lines if "decoder positions; passages used:" in x)) + 1:]
    assert [line.split()[1][0] for line in used[:3]] == ["p", "p", "p"]  # score, passage id, text


def test_cli_errors_are_clear(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    done = _cli("index", "--corpus", str(bad), "--out", str(tmp_path / "i"), "--model", str(tiny_ckpt))
    assert done.returncode == 2 and "bad.jsonl:2: malformed JSON" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "i").exists()
    missing = _cli("ask", "--index", str(tmp_path / "none"), "--model", str(tiny_ckpt), "q")
    assert missing.returncode == 2 and "not an index" in missing.stderr
    no_tokens = _cli("index", "--corpus", str(bad), "--out", str(tmp_path / "i"), "--model", str(tiny_ckpt),
                     "--retriever-max-tokens", "0")
    assert no_tokens.returncode == 2 and "at least one word piece" in no_tokens.stderr
    assert "Traceback" not in no_tokens.stderr and not (tmp_path / "i").exists()


def test_cli_refuses_to_grow_an_index_with_another_retriever_setting(index, tiny_ckpt, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in index.records[:2]))
    out = tmp_path / "index"
    assert _cli("index", "--corpus", str(corpus), "--out", str(out), "--model", str(tiny_ckpt)).returncode == 0
    other = _cli("index", "--corpus", str(corpus), "--out", str(out), "--model", str(tiny_ckpt),
                 "--retriever-max-tokens", "256")
    assert other.returncode == 2 and "built with retriever" in other.stderr and "Traceback" not in other.stderr
