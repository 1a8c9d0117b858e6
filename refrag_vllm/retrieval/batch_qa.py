"""Answer a jsonl of questions: in this process, or with Ray Data workers that each hold
a vLLM engine (``refrag-vllm ask --questions FILE --out FILE [--ray --workers N]``).

Input: one ``{"question": ..., "id": optional}`` per line (ids default to the line
number).  Output: one line per question, in input order, written to a temporary file
and renamed when complete: ``{"id", "question", "answer", "passages": [ids], "positions"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..modes import REFRAG_CACHED
from .corpora import CorpusError, iter_jsonl


def read_questions(path: str | Path) -> list[dict]:
    out, seen = [], set()
    for lineno, obj in iter_jsonl(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise CorpusError(f"{path}:{lineno}: expected an object with a non-empty string \"question\"")
        qid = str(obj.get("id", lineno))
        if qid in seen:
            raise CorpusError(f"{path}:{lineno}: duplicate id {qid!r}")
        seen.add(qid)
        out.append({"id": qid, "question": obj["question"]})
    if not out:
        raise CorpusError(f"{path}: no questions")
    return out


def _records(questions: Sequence[dict], answers) -> list[dict]:
    return [{"id": q["id"], "question": q["question"], "answer": a.answer,
             "passages": [h.id for h in a.passages], "positions": a.positions}
            for q, a in zip(questions, answers)]


def _write(out: str | Path, records: Sequence[dict]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out)


def answer_file(rag, questions_path, out, *, top_k: int = 3, mode: str = REFRAG_CACHED, sampling_params=None) -> int:
    """All questions in one offline batch on this process's engine."""
    questions = read_questions(questions_path)
    answers = rag.generate([q["question"] for q in questions], top_k, mode=mode,
                           sampling_params=sampling_params, use_tqdm=True)
    _write(out, _records(questions, answers))
    return len(questions)


class AnswerBatch:
    """A Ray Data actor: one vLLM engine + index, ``{"id", "question"}`` batches -> answers."""

    def __init__(self, index_dir: str, model_dir: str, top_k: int, mode: str, max_tokens: int,
                 engine_kwargs: dict) -> None:
        from vllm import LLM, SamplingParams

        from .rag import RefragRAG

        self.rag = RefragRAG(index_dir, LLM(model=model_dir, **engine_kwargs), model_dir=model_dir)
        self.top_k, self.mode = top_k, mode
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def __call__(self, batch: dict) -> dict:
        questions = [{"id": str(i), "question": str(q)} for i, q in zip(batch["id"], batch["question"])]
        answers = self.rag.generate([q["question"] for q in questions], self.top_k, mode=self.mode,
                                    sampling_params=self.params)
        recs = _records(questions, answers)
        return {"record": [json.dumps(r, ensure_ascii=False) for r in recs]}


def answer_file_ray(index_dir, model_dir, questions_path, out, *, num_workers: int = 1, batch_size: int = 16,
                    top_k: int = 3, mode: str = REFRAG_CACHED, max_tokens: int = 128, address: str | None = None,
                    engine_kwargs: dict | None = None) -> int:
    """The same with Ray Data: ``num_workers`` actors, each with its own engine."""
    import ray

    from ..engine import engine_defaults
    from .index import PassageIndex
    from .ray_index import init_ray

    questions = read_questions(questions_path)
    PassageIndex.open(index_dir).check_model(model_dir)  # fail here, not in every worker
    # The index's cached vectors come from this process: enable_mm_embeds lets them in.
    engine_kwargs = {"enable_mm_embeds": True,
                     **(engine_kwargs or engine_defaults())}
    init_ray(address, env_vars=engine_env_for_workers())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(questions, override_num_blocks=max(1, min(len(questions) // batch_size,
                                                                           num_workers * 4)))
    ds = ds.map_batches(AnswerBatch, batch_size=batch_size, concurrency=num_workers, num_cpus=1,
                        fn_constructor_kwargs=dict(index_dir=str(Path(index_dir).resolve()),
                                                   model_dir=str(Path(model_dir).resolve()), top_k=top_k,
                                                   mode=mode, max_tokens=max_tokens, engine_kwargs=engine_kwargs))
    records = [json.loads(r["record"]) for r in ds.iter_rows()]
    _write(out, records)
    return len(records)


def engine_env_for_workers() -> dict:
    """Env for Ray workers: engines that share a machine must not pin the same cores."""
    return {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
