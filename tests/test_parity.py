"""vLLM RefragLlamaForCausalLM == PyTorch reference, greedy tokens and logprobs.

One engine for the module (prefix caching on, the vLLM default; the chunk-vector cache on,
its stats in a file, preloaded from an index)."""

import json
import os

import pytest
import torch

from helpers import PASSAGES, QUESTION, assert_matches_reference, greedy, index_of, make_llm, shutdown_llm
from refrag_vllm import CompressedChunks, Passage
from refrag_vllm.chunk_cache import PRELOAD_ENV, STATS_FILE_ENV

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def cache_stats_file(tmp_path_factory):
    return tmp_path_factory.mktemp("chunk-cache") / "stats.json"


PRELOADED = ["Indexed before the engine started. " + p for p in PASSAGES]


@pytest.fixture(scope="module")
def preloaded_index(tiny_ckpt, tmp_path_factory):
    """An index (``refrag-vllm index``) of :data:`PRELOADED`, whose REFRAG cache the engine preloads."""
    return index_of(PRELOADED, tmp_path_factory.mktemp("preload"), tiny_ckpt)


@pytest.fixture(scope="module")
def llm(tiny_ckpt, cache_stats_file, preloaded_index):
    env = {STATS_FILE_ENV: str(cache_stats_file), PRELOAD_ENV: str(preloaded_index.path)}
    os.environ.update(env)  # the engine process inherits them
    try:
        llm = make_llm(tiny_ckpt, enable_prefix_caching=True)
    finally:
        for name in env:
            del os.environ[name]
    yield llm
    shutdown_llm(llm)


def test_raw_chunks(llm, builder, reference):
    prompt = builder.build(QUESTION, PASSAGES)
    expanded = builder.build(QUESTION, PASSAGES, expand=builder.every_chunk(PASSAGES))
    assert "multi_modal_data" not in expanded
    n_chunks = sum(len(builder.chunk_passage(p)) for p in PASSAGES)
    # Each compressed chunk saves (its tokens - 1) positions.
    assert builder.num_positions(prompt) == len(expanded["prompt_token_ids"]) - sum(
        len(c) - 1 for p in PASSAGES for c in builder.chunk_passage(p))
    assert n_chunks >= 6
    assert_matches_reference(reference, prompt, greedy(llm, [prompt])[0])


def _chunk_texts(builder, passage):
    return [builder.tokenizer.decode(c) for c in builder.chunk_passage(passage)]


def test_precomputed_encoder_vectors(llm, builder, reference):
    with torch.no_grad():
        encs = [reference.encode_texts(_chunk_texts(builder, p)) for p in PASSAGES]
    prompt = builder.build(QUESTION, [CompressedChunks.from_encoder_embeds(e) for e in encs])
    result = greedy(llm, [prompt])[0]
    assert_matches_reference(reference, prompt, result)
    # Same chunks as raw text give the same output.
    text_result = greedy(llm, [builder.build(QUESTION, PASSAGES)])[0]
    assert result[0] == text_result[0]
    assert max(abs(a - b) for a, b in zip(result[1], text_result[1])) < 1e-4


def test_precomputed_projected_vectors(llm, builder, reference):
    with torch.no_grad():
        proj = [reference.project_item(CompressedChunks.from_texts(_chunk_texts(builder, p))) for p in PASSAGES]
    prompt = builder.build(QUESTION, [CompressedChunks.from_projected_embeds(e) for e in proj])
    result = greedy(llm, [prompt])[0]
    assert_matches_reference(reference, prompt, result)
    text_result = greedy(llm, [builder.build(QUESTION, PASSAGES)])[0]
    assert result[0] == text_result[0]


def test_mixed_expanded_and_compressed(llm, builder, reference):
    prompt = builder.build(QUESTION, PASSAGES, expand=[[1], [0, 2], []])
    n_items = len(prompt["multi_modal_data"]["refrag_chunk"])
    assert n_items == 5  # [0] [2..] | [1] [3..] | [0..]
    result = greedy(llm, [prompt])[0]
    assert_matches_reference(reference, prompt, result)


def test_kinds_interleaved_in_one_prompt(llm, builder, reference):
    with torch.no_grad():
        enc = reference.encode_texts(_chunk_texts(builder, PASSAGES[1]))
        proj = reference.project_item(CompressedChunks.from_texts(_chunk_texts(builder, PASSAGES[2])))
    passages = [Passage(text=PASSAGES[0], expand=(1,)), CompressedChunks.from_encoder_embeds(enc),
                CompressedChunks.from_projected_embeds(proj)]
    prompt = builder.build(QUESTION, passages)
    assert_matches_reference(reference, prompt, greedy(llm, [prompt])[0])


def test_prefix_cache_hit_is_content_sensitive(llm, builder, reference):
    passages = [" ".join(PASSAGES) + " Cached once.", PASSAGES[0]]
    prompt = builder.build(QUESTION, passages)
    first = greedy(llm, [prompt])[0]
    second = greedy(llm, [prompt])[0]
    assert second[2].num_cached_tokens > 0
    assert first[0] == second[0]
    assert_matches_reference(reference, prompt, second)
    # Same prefix, different second passage: only the shared prefix may hit.
    changed = builder.build(QUESTION, [passages[0], PASSAGES[1]])
    third = greedy(llm, [changed])[0]
    assert 0 < third[2].num_cached_tokens < builder.num_positions(changed)
    assert_matches_reference(reference, changed, third)


def test_batch_of_requests(llm, builder, reference):
    prompts = [builder.build(QUESTION, PASSAGES[i:]) for i in range(3)]
    for prompt, result in zip(prompts, greedy(llm, prompts)):
        assert_matches_reference(reference, prompt, result)


@pytest.mark.slow
def test_2000_compressed_chunks_past_window(llm, builder, reference):
    """2,000 chunks of k=16 (32k context tokens, 4x the 8192-position window)."""
    texts = [f"chunk {i}: the encoder embeds each chunk into the decoder space" for i in range(2000)]
    prompt = builder.render(
        "<|im_start|>user\n" + "".join(f"<passage>{' '.join(texts[s:s+100])}</passage>" for s in range(0, 2000, 100))
        + "\nQuestion: what is chunk 7?<|im_end|>\n<|im_start|>assistant\n"
    )
    n_chunks = sum(i.num_chunks for i in prompt["multi_modal_data"]["refrag_chunk"])
    n_tokens = n_chunks * 16
    assert n_chunks >= 2000 and n_tokens >= 4 * 8192
    assert builder.num_positions(prompt) < 8192
    result = greedy(llm, [prompt], max_tokens=4)[0]
    assert_matches_reference(reference, prompt, result, max_tokens=4)


def test_offline_bad_input_raises_and_engine_keeps_working(llm, builder, reference):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=2)
    ids = builder.tokenizer("hello")["input_ids"]
    pid = builder.placeholder_id
    with pytest.raises(ValueError, match="placeholder"):
        llm.generate({"prompt_token_ids": ids + [pid]}, params, use_tqdm=False)
    with pytest.raises(ValueError, match="width 65"):
        llm.generate({"prompt_token_ids": ids + [pid],
                      "multi_modal_data": {"refrag_chunk": [{"projected_embeds": torch.zeros(2, 65)}]}},
                     params, use_tqdm=False)
    with pytest.raises(ValueError, match="1 placeholder token.*2 refrag_chunk item"):
        llm.generate({"prompt_token_ids": ids + [pid],
                      "multi_modal_data": {"refrag_chunk": [{"texts": ["a b"]}, {"texts": ["c d"]}]}},
                     params, use_tqdm=False)
    prompt = builder.build(QUESTION, PASSAGES[:1])
    assert_matches_reference(reference, prompt, greedy(llm, [prompt])[0])


def test_qa_generation_answers_every_condition(llm, builder):
    """The held-out QA generation eval (refrag_train.qa_generation) on this engine."""
    from refrag_train.qa_generation import CONDITIONS, GOLD_CONDITIONS, answer_and_score, build_prompts, content_recall

    examples = [{"question": QUESTION, "answer": "Paris is the capital of France.", "passages": PASSAGES[:2]},
                {"question": "What are tuples?", "answer": "Immutable sequences.", "passages": PASSAGES[1:]}]
    rows, records = answer_and_score(llm, builder, examples, max_tokens=8)
    assert [r["condition"] for r in rows] == list(CONDITIONS)
    def built(question, passages):
        return _prompt_content(builder.build(question, passages))

    # with each example's answer passage named: that passage alone, and another example's as its control
    gold = build_prompts(builder, [dict(ex, gold=i) for i, ex in enumerate(examples)])
    assert list(gold) == list(CONDITIONS + GOLD_CONDITIONS)
    assert [_prompt_content(p) for p in gold[GOLD_CONDITIONS[0]]] == [
        built(QUESTION, [PASSAGES[0]]), built("What are tuples?", [PASSAGES[2]])]
    assert [_prompt_content(p) for p in gold[GOLD_CONDITIONS[1]]] == [
        built(QUESTION, [PASSAGES[2]]), built("What are tuples?", [PASSAGES[0]])]
    assert list(build_prompts(builder, examples[:1])) == list(CONDITIONS[:3])  # one question: no other's passages
    assert all(0.0 <= r["content_recall"] <= 1.0 for r in rows)
    by = {r["condition"]: r["positions"] for r in rows}
    assert by[CONDITIONS[0]] < by[CONDITIONS[1]] < by[CONDITIONS[2]]
    prompts = build_prompts(builder, examples)  # the control: another example's passages, compressed
    assert [_prompt_content(p) for p in prompts[CONDITIONS[3]]] == [
        built(QUESTION, PASSAGES[1:]), built("What are tuples?", PASSAGES[:2])]
    assert all(isinstance(rec[c], str) for rec in records for c in CONDITIONS)
    assert content_recall("The capital is Paris, in France", "Paris is the capital of France.") == 1.0
    assert content_recall("Berlin", "Paris is the capital of France.") == 0.0
    assert rows[0]["vs_no_passages"]["mean"] == 0.0 and rows[0]["vs_no_passages"]["wins"] == 0


def _prompt_content(prompt):
    """A built prompt's token ids and the texts of its compressed chunks."""
    return prompt["prompt_token_ids"], [c.texts for c in prompt.get("multi_modal_data", {}).get("refrag_chunk", [])]


def test_paired_difference_by_hand():
    from refrag_train.qa_generation import paired_difference

    d = paired_difference([0.5, 0.25, 1.0, 0.0], [0.25, 0.25, 0.5, 0.5])
    assert d["mean"] == 0.0625 and (d["wins"], d["losses"]) == (2, 1)
    assert abs(d["se"] - (sum((x - 0.0625) ** 2 for x in [0.25, 0.0, 0.5, -0.5]) / 3 / 4) ** 0.5) < 1e-12


def test_qa_generation_table_reads_each_condition_against_no_passages():
    from refrag_train.qa_generation import CONDITIONS, markdown

    vs = {"mean": 0.0625, "se": 0.125, "wins": 2, "losses": 1}
    rows = [{"condition": c, "content_recall": r, "positions": n, "vs_no_passages": vs}
            for c, r, n in zip(CONDITIONS, (0.2, 0.25, 0.5), (40, 60, 300))]
    rows[1]["vs_control"] = {"mean": 0.05, "se": 0.01, "wins": 3, "losses": 0}
    lines = markdown({"num_questions": 4, "data": "heldout", "rows": rows}).splitlines()
    assert lines[-1] == f"{CONDITIONS[1]} − its control ({CONDITIONS[3]}): +0.050 ± 0.010 (3 / 0)"
    assert lines[2] == "| Passages | content recall | vs no passages: mean ± s.e. (wins / losses) | decoder positions |"
    assert lines[3] == "|---|---|---|---|"
    assert lines[4] == f"| {CONDITIONS[0]} | 0.200 | — | 40 |"
    assert lines[5] == f"| {CONDITIONS[1]} | 0.250 | +0.062 ± 0.125 (2 / 1) | 60 |"


def _cache_stats(path):
    return json.loads(path.read_text())


def _forget_items(llm):
    """Drop vLLM's own reuse of whole items (prefix cache, encoder cache), so that the next
    request runs ``embed_multimodal`` again and only the chunk-vector cache can remember."""
    assert llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


def test_chunk_cache_hit_equals_miss(llm, builder, reference, cache_stats_file):
    passages = ["Chunk cache parity: " + p for p in PASSAGES]
    prompt = builder.build(QUESTION, passages)
    n_chunks = sum(len(builder.chunk_passage(p)) for p in passages)
    before = _cache_stats(cache_stats_file) if cache_stats_file.exists() else {"hits": 0, "misses": 0}
    miss = greedy(llm, [prompt])[0]
    after_miss = _cache_stats(cache_stats_file)
    missed = after_miss["misses"] - before["misses"]
    assert missed > 0 and missed + after_miss["hits"] - before["hits"] == n_chunks
    _forget_items(llm)
    hit = greedy(llm, [prompt])[0]
    after_hit = _cache_stats(cache_stats_file)
    assert hit[2].num_cached_tokens == 0
    assert after_hit["hits"] - after_miss["hits"] == n_chunks
    assert after_hit["misses"] == after_miss["misses"]
    assert hit[0] == miss[0] and hit[1] == miss[1]  # the same vectors: identical logprobs
    assert_matches_reference(reference, prompt, hit)


def test_chunk_cache_mixes_hits_and_misses_across_items(llm, builder, reference, cache_stats_file):
    """Chunks seen in other items, at other positions, hit; new chunks miss, in one batch."""
    seen = "Seen before in another request. " + PASSAGES[0]
    greedy(llm, [builder.build("First question?", [seen])])
    _forget_items(llm)
    before = _cache_stats(cache_stats_file)
    new = "Never seen before: " + PASSAGES[2]
    prompt = builder.build(QUESTION, [new, PASSAGES[1] + " A fresh tail.", seen], expand=[[], [0], []])
    result = greedy(llm, [prompt])[0]
    after = _cache_stats(cache_stats_file)
    assert after["hits"] - before["hits"] >= len(builder.chunk_passage(seen))
    assert after["misses"] > before["misses"]
    assert_matches_reference(reference, prompt, result)


def test_preloaded_index_chunks_hit_on_first_sight(llm, builder, reference, cache_stats_file, preloaded_index):
    """Passages the engine's cache was preloaded with (``REFRAG_CHUNK_CACHE_PRELOAD``) hit the
    first time a client sends them as text, and answer exactly as the index's vectors sent by
    a cached client do."""
    prompt = builder.build(QUESTION, PRELOADED)
    n_chunks = sum(len(builder.chunk_passage(p)) for p in PRELOADED)
    before = _cache_stats(cache_stats_file) if cache_stats_file.exists() else {"hits": 0, "misses": 0}
    text = greedy(llm, [prompt])[0]
    after = _cache_stats(cache_stats_file)
    assert after["hits"] - before["hits"] == n_chunks and after["misses"] == before["misses"]
    vectors = builder.build(QUESTION, [CompressedChunks.from_projected_embeds(preloaded_index.chunk_embeds(row))
                                       for row in range(len(PRELOADED))])
    cached = greedy(llm, [vectors])[0]
    assert text[0] == cached[0] and text[1] == cached[1]
    assert_matches_reference(reference, vectors, text)
