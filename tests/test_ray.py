"""Ray on a local cluster that the tests start and stop: the index build and batch QA."""

import json
import os

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # two engines share the two cores
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from real_text import real_passages

    path = tmp_path_factory.mktemp("ray") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(real_passages(60))))
    return path


@pytest.fixture(scope="module")
def single(corpus, tiny_ckpt):
    from refrag_vllm.retrieval.index import build_index

    return build_index(corpus, corpus.parent / "single", tiny_ckpt, batch_size=16, progress=False)


def test_ray_index_build_equals_the_single_process_build(ray_cluster, corpus, single, tiny_ckpt):
    from refrag_vllm.retrieval.ray_index import build_index_ray

    ray_index = build_index_ray(corpus, corpus.parent / "ray", tiny_ckpt, batch_size=16, num_workers=2,
                                progress=False)
    assert [r["id"] for r in ray_index.records] == [r["id"] for r in single.records]
    assert [r["num_chunks"] for r in ray_index.records] == [r["num_chunks"] for r in single.records]
    # The retriever runs in bfloat16: a passage padded to another batch's width rounds differently.
    np.testing.assert_allclose(ray_index.vectors(), single.vectors(), atol=2e-3)
    for row in range(len(single)):
        torch.testing.assert_close(ray_index.chunk_embeds(row), single.chunk_embeds(row), atol=1e-5, rtol=1e-5)
    assert ray_index.meta["num_chunk_rows"] == single.meta["num_chunk_rows"]


def test_ray_batch_qa_answers_every_question_exactly_once(ray_cluster, single, tiny_ckpt, tmp_path):
    from refrag_vllm.retrieval.batch_qa import answer_file_ray

    questions = tmp_path / "q.jsonl"
    lines = [json.dumps({"id": f"q{i}", "question": f"What does passage {i} say about files and errors?"})
             for i in range(10)]
    questions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    n = answer_file_ray(single.path, tiny_ckpt, questions, out, num_workers=2, batch_size=3, max_tokens=4,
                        engine_kwargs=dict(enforce_eager=True, max_model_len=2048, dtype="float32",
                                           max_num_seqs=4, block_size=32))
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == 10 and [a["id"] for a in answers] == [f"q{i}" for i in range(10)]
    assert all(len(a["passages"]) == 3 and a["positions"] > 0 for a in answers)
    assert not (tmp_path / "answers.jsonl.tmp").exists()
