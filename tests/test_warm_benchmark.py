"""The warm-traffic harness's --quick profile: every condition runs on its own server and
the files are well formed; the chunk-vector cache fills only where it is on. Timings are not asserted (benchmarks measure; tests check behaviour)."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def warm_results(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("warm")
    (out / "results.json").write_text(json.dumps({"summary": {"k16_cached_vs_ceiling_512": 0.9}}))  # a cold run's
    proc = subprocess.run([sys.executable, "-m", "benchmarks.warm", "--quick", "--model", str(tiny_ckpt),
                           "--out", str(out), "--summary", str(out / "results.json")],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "warm.json").read_text())


def test_every_condition_and_level_is_measured(warm_results):
    from benchmarks.warm import PROFILES, first_sight_requests, zipf_requests

    _, res = warm_results
    assert list(res["conditions"]) == ["vanilla", "refrag", "refrag-preloaded", "refrag-no-chunk-cache",
                                       "refrag-cached"]
    cfg = PROFILES["quick"]
    plan = zipf_requests(cfg)
    first_sight = first_sight_requests(plan, cfg)
    # a timed request is first-sight when one of its passages is in no earlier request of the plan
    seen = {j for picked, _ in plan[:cfg.warmup] for j in picked}
    level_one = plan[cfg.warmup:cfg.warmup + cfg.requests]
    assert first_sight[0] == sum(bool(set(picked) - seen - {j for p, _ in level_one[:i] for j in p})
                                 for i, (picked, _) in enumerate(level_one))
    for result in res["conditions"].values():
        rows = result["rows"]
        assert [r["concurrency"] for r in rows] == [1, 2]
        assert [r["first_sight_requests"] for r in rows] == first_sight
        for r in rows:
            assert r["requests"] == 4 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
            assert r["requests_per_s"] > 0 and r["output_tokens_per_s"] > 0


def test_the_chunk_cache_hits_only_where_it_is_on(warm_results):
    _, res = warm_results
    text = res["conditions"]["refrag"]
    # In this tiny profile vLLM's own item-level caches serve every repeated passage whole, so the
    # chunk cache only fills; its hits are measured by the full profile.
    assert text["chunk_cache"]["misses"] > 0
    assert text["chunk_cache"]["entries"] > 0 and text["chunk_cache"]["bytes"] > 0
    for condition in ("refrag-no-chunk-cache", "refrag-cached"):  # the cache is off / no text chunks reach it
        result = res["conditions"][condition]
        assert all(r["chunk_cache_hit_rate"] is None for r in result["rows"])
        assert result["chunk_cache"]["entries"] == 0
    # Preloaded from an index of the pool: every chunk the traffic sends is there from the start.
    preloaded = res["conditions"]["refrag-preloaded"]["chunk_cache"]
    assert preloaded["misses"] == 0 and preloaded["hits"] > 0
    assert preloaded["entries"] >= text["chunk_cache"]["entries"]
    b = res["passage_bytes"]
    assert b["kv_over_chunk_cache"] > 1


def test_report_files(warm_results):
    out, res = warm_results
    md = (out / "warm.md").read_text()
    assert res["command"] in md and "chunk-cache hits" in md and "KV" in md
    assert (out / "warm_ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_servers_run_in_the_dtype_refrag_vllm_serve_picks(warm_results):
    from refrag_vllm.engine import serving_dtype

    out, res = warm_results
    dtype = res["config"]["dtype"]
    assert dtype == serving_dtype()
    assert f"served in {dtype}" in (out / "warm.md").read_text()
    for condition in res["conditions"]:  # vLLM's own account of the engine it built
        assert f"dtype=torch.{dtype}," in (out / f"server_{condition}.log").read_text()


def test_summary_merges_the_warm_ratios_into_the_cold_results(warm_results):
    out, res = warm_results
    p50 = {c: r["rows"][0]["ttft_p50_s"] for c, r in res["conditions"].items()}
    merged = json.loads((out / "results.json").read_text())["summary"]
    assert merged["k16_cached_vs_ceiling_512"] == 0.9  # the cold run's key is kept
    assert merged["warm_text_cached_vs_vector_ttft_p50"] == pytest.approx(p50["refrag"] / p50["refrag-cached"])
    assert merged["warm_text_vs_vanilla_prefix_ttft_p50"] == pytest.approx(p50["vanilla"] / p50["refrag"])
    assert merged["warm_text_preloaded_vs_vector_ttft_p50"] == pytest.approx(
        p50["refrag-preloaded"] / p50["refrag-cached"])
    b = res["passage_bytes"]
    assert merged["bytes_per_cached_chunk"] == b["bytes_per_vector"] > 0
    assert merged["kv_bytes_per_chunk"] == b["kv_bytes_per_token"] * b["chunk_size"] > merged["bytes_per_cached_chunk"]
    assert merged["warm_concurrency"] == 1
