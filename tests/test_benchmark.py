"""The TTFT harness's --quick profile: it runs every mode and vantage point and writes
well-formed files.  Timings are not asserted (benchmarks measure; tests check behaviour)."""

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def quick_results(tiny_ckpt, tmp_path_factory):
    from tiny_models import add_random_policy

    model = add_random_policy(tiny_ckpt, tmp_path_factory.mktemp("policy") / "tiny-with-policy")
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ttft", "--quick", "--model", str(model), "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_mode_length_and_k_is_measured(quick_results):
    _, res = quick_results
    rows = res["offline"]["rows"]
    lengths = [256, 512]
    got = {(r["mode"], r["k"], r["context_tokens"]) for r in rows}
    for n in lengths:
        assert ("vanilla", None, n) in got
    for n in lengths + [2048]:
        for mode in ("refrag", "refrag-cached", "refrag-policy", "ceiling"):
            assert (mode, 16, n) in got
    assert ("vanilla", None, 2048) not in got, "2048 tokens is past the quick profile's vanilla window"
    for r in rows:
        t = r["ttft_s"]
        assert t["n"] == 1 and 0 < t["min"] <= t["median"] <= t["max"]
        assert r["tpot_s"] > 0 and r["kv_blocks"] >= 1
    engine = res["offline"]["engine"]
    assert engine["peak_memory_startup_mib"] > 0 and engine["peak_memory_measuring_mib"] > 0


def test_positions_shrink_about_k_times_and_the_ceiling_matches_them(quick_results):
    _, res = quick_results
    idx = {(r["mode"], r["k"], r["context_tokens"]): r for r in res["offline"]["rows"]}
    for n in (256, 512):
        vanilla = idx[("vanilla", None, n)]["positions"]
        cached = idx[("refrag-cached", 16, n)]["positions"]
        assert cached == idx[("ceiling", 16, n)]["positions"]
        assert abs(idx[("refrag", 16, n)]["positions"] - cached) <= 0.05 * cached  # other passages, same sizes
        assert n / 16 < cached < vanilla - n * 0.8
        policy = idx[("refrag-policy", 16, n)]
        assert policy["positions"] > cached and policy["expanded"] >= 1


def test_throughput_server_crosscheck_and_transformers_rows(quick_results):
    _, res = quick_results
    modes = {r["mode"] for r in res["offline"]["throughput"]}
    assert modes == {"vanilla", "refrag", "refrag-cached", "refrag-policy"}
    assert all(r["output_tokens"] == r["requests"] * res["config"]["throughput_tokens"] for r in res["offline"]["throughput"])
    server = {(r["mode"], r["context_tokens"]) for r in res["server"]["rows"]}
    assert {("vanilla", 256), ("refrag", 256), ("refrag-cached", 256), ("refrag-policy", 256), ("refrag", 2048)} <= server
    cross = res["server"]["bench_serve"]
    assert len(cross) == 1 and cross[0]["bench_serve_median_ttft_ms"] > 0
    assert [r["context_tokens"] for r in res["transformers"]] == [256, 512]


def test_report_files(quick_results):
    out, res = quick_results
    md = (out / "results.md").read_text()
    assert "speed-up vs vanilla" in md and "ceiling speed-up" in md and "vllm bench serve" in md
    assert res["command"] in md
    for png in ("ttft_vs_length.png", "speedup_vs_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_holds_the_headline_ratios(quick_results):
    _, res = quick_results
    s = res["summary"]
    rows = {(r["mode"], r["k"], r["context_tokens"]): r["ttft_s"]["median"] for r in res["offline"]["rows"]}
    ceiling = rows[("ceiling", 16, 512)]
    assert s["k16_cached_vs_ceiling_512"] == pytest.approx(ceiling / rows[("refrag-cached", 16, 512)])
    assert s["k16_text_cold_vs_ceiling_512"] == pytest.approx(ceiling / rows[("refrag", 16, 512)])
    assert s["kv_bytes_per_chunk"] == res["offline"]["engine"]["kv_bytes_per_position"] * 16
    alone = res["encoder_alone"]
    assert alone["context_tokens"] == 512 and alone["chunks"] >= 512 // 16 and alone["seconds"]["median"] > 0
    assert s["encoder_engine_vs_standalone_rate"] == pytest.approx(
        alone["seconds"]["median"] / (rows[("refrag", 16, 512)] - rows[("refrag-cached", 16, 512)]))
    from benchmarks.ttft import encoder_summary  # what --summary merges into another run's results.json

    label = f"{alone['encoder']['model_type']}_{alone['encoder']['num_hidden_layers']}_layers"
    assert encoder_summary(res, s) == {"encoder_engine_vs_standalone_rate": s["encoder_engine_vs_standalone_rate"],
                                       f"k16_text_cold_vs_ceiling_512_{label}": s["k16_text_cold_vs_ceiling_512"]}


def test_quick_run_records_the_engines_dtype(quick_results):
    from refrag_vllm.engine import serving_dtype

    out, res = quick_results
    assert res["config"]["dtype"] == serving_dtype()
    assert f"{serving_dtype()}, KV cache" in (out / "results.md").read_text()


def test_dtype_cost_table_reads_each_row_as_bf16_over_fp32(tmp_path):
    from benchmarks.dtype_cost import markdown
    from benchmarks.options import write_result

    result = {"tokens": 2048, "train_tokens": 256, "config": "cpu", "repeats": 3,
              "machine": {"machine": "x86_64", "threads": 2, "cpu_capability": "AVX2", "native_bf16": False,
                          "serving_dtype": "float32"},
              "serving": [{"dtype": d, "mode": m, "positions": 1, "ttft_s": t}
                          for d, m, t in (("bfloat16", "vanilla", 4.0), ("float32", "vanilla", 1.0),
                                          ("bfloat16", "refrag", 0.9), ("float32", "refrag", 0.3))],
              "index": [{"dtype": "bfloat16", "mode": "retriever", "seconds": 2.0},
                        {"dtype": "float32", "mode": "retriever", "seconds": 0.5}],
              "training": [{"dtype": "bfloat16", "step_s": 30.0}, {"dtype": "float32", "step_s": 1.5}]}
    write_result(tmp_path, "dtype_cost", result, markdown(result))
    assert json.loads((tmp_path / "dtype_cost.json").read_text()) == result
    lines = (tmp_path / "dtype_cost.md").read_text().splitlines()
    assert "`serving_dtype()` here: **float32**" in lines[0]
    assert "| vanilla | 4.000 | 1.000 | 4.0× |" in lines and "| refrag | 0.900 | 0.300 | 3.0× |" in lines
    assert "| retriever | 2.000 | 0.500 | 4.0× |" in lines and "| training step | 30.00 | 1.50 | 20.0× |" in lines
