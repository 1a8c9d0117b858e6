"""Greedy answers to held-out questions, scored by the reference answer's content words.

    python -m refrag_train.qa_generation --checkpoint CKPT --data data/gcide --out runs/qa-gcide [--num 200]

Every question of ``qa_heldout.jsonl`` is answered by vLLM (the served model, greedy)
four ways, in one engine and one run: with **no passages**, with its passages
**compressed** (REFRAG), with the same passages as raw tokens (**vanilla** RAG), and, the
control, with **another question's passages compressed** (the example half the list away,
so from another page): what any compressed passages give an answer (its style, its length)
without its content.
The score is *content recall*: the fraction of the reference answer's content words
(lower-cased words of 3+ letters, stop words removed) found in the generated answer.
Compressed passages work when they score clearly above no passages and above the control,
towards vanilla: each row gives its paired difference from no passages over the same
questions (mean ± standard error, and how many questions it wins and loses), and the table's
last lines each treatment's paired difference from its control.

Where every example names its answer's passage (``gold``, as the Python docs' QA does), two
more rows separate *reading* a compressed passage from *finding* it among others: the
answer's passage alone, compressed, and its control, another question's answer passage
alone, compressed (the same other question's).

Writes ``answers.jsonl`` (every answer) and ``qa_generation.json`` / ``.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from refrag_vllm.engine import DTYPES
from refrag_vllm.markdown import table_lines

from .data import read_jsonl

CONDITIONS = ("No passages", "Compressed passages (REFRAG)", "Raw passages (vanilla RAG)",
              "Compressed, another question's passages (control)")
GOLD_CONDITIONS = ("Compressed, the answer's passage alone", "Compressed, another question's answer passage")
CONTROLS = {CONDITIONS[1]: CONDITIONS[3], GOLD_CONDITIONS[0]: GOLD_CONDITIONS[1]}
"""Each compressed treatment's control: the same layout with another question's passages."""
STOP_WORDS = frozenset(
    "the and for are but not you all any can had her was one our out has him his how its may new now old see "
    "two way who did get let put say she too use that with have this will your from they been more when what "
    "which their there would about into than them then these some such only also very just over most other "
    "were each many much those being does done made make like used uses using upon where while whom whose "
    "why yes both same after before under between through during without within among because could should "
    "shall might must here once every either neither nor per via etc".split())


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z][a-z0-9_]{2,}", text.lower()) if w not in STOP_WORDS}


def content_recall(answer: str, reference: str) -> float:
    """Fraction of ``reference``'s content words present in ``answer`` (0 when it has none)."""
    ref = content_words(reference)
    return len(ref & content_words(answer)) / len(ref) if ref else 0.0


def paired_difference(treatment: list[float], control: list[float]) -> dict:
    """Per-question ``treatment - control``: mean, standard error of the mean, wins, losses."""
    diffs = [t - c for t, c in zip(treatment, control, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}


def control_examples(examples: list[dict]) -> list[dict]:
    """Each example's control partner: the example half the list away (so, in a list ordered by
    page, another page's); empty for fewer than two examples."""
    n = len(examples)
    return [examples[(i + n // 2) % n] for i in range(n)] if n >= 2 else []


def build_prompts(builder, examples: list[dict]) -> dict[str, list[dict]]:
    """``{condition: [prompt per example]}``: the first three :data:`CONDITIONS`; with two
    examples or more, the control (another question's passages), and :data:`GOLD_CONDITIONS`
    when each example names its answer's passage (``gold``)."""
    prompts = {c: [] for c in CONDITIONS[:3]}
    for ex in examples:
        q, ps = ex["question"], ex["passages"]
        prompts[CONDITIONS[0]].append(builder.build(q, []))
        prompts[CONDITIONS[1]].append(builder.build(q, ps))
        prompts[CONDITIONS[2]].append(builder.build(q, ps, expand=builder.every_chunk(ps)))
    others = control_examples(examples)
    if not others:  # no other question to take passages from
        return prompts
    prompts[CONDITIONS[3]] = [builder.build(ex["question"], o["passages"]) for ex, o in zip(examples, others)]
    if all(ex.get("gold") is not None for ex in examples):
        def gold(ex):
            return [ex["passages"][ex["gold"]]]

        prompts[GOLD_CONDITIONS[0]] = [builder.build(ex["question"], gold(ex)) for ex in examples]
        prompts[GOLD_CONDITIONS[1]] = [builder.build(ex["question"], gold(o)) for ex, o in zip(examples, others)]
    return prompts


def answer_and_score(llm, builder, examples: list[dict], max_tokens: int = 48) -> tuple[list[dict], list[dict]]:
    """Greedy answers under every condition on ``llm`` (a ``vllm.LLM``); returns the table's
    rows and one record per example holding its answers."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    records = [dict(id=ex.get("id", i), question=ex["question"], reference=ex["answer"])
               for i, ex in enumerate(examples)]
    rows, recalls = [], {}
    for condition, batch in build_prompts(builder, examples).items():
        outputs = llm.generate(batch, params, use_tqdm=True)
        for rec, o in zip(records, outputs):
            rec[condition] = o.outputs[0].text
        recalls[condition] = [content_recall(rec[condition], rec["reference"]) for rec in records]
        rows.append({"condition": condition, "content_recall": sum(recalls[condition]) / len(records),
                     "positions": sum(builder.num_positions(p) for p in batch) / len(batch),
                     "vs_no_passages": paired_difference(recalls[condition], recalls[CONDITIONS[0]])})
    for row in rows:
        control = CONTROLS.get(row["condition"])
        if control in recalls:
            row["vs_control"] = paired_difference(recalls[row["condition"]], recalls[control])
    return rows, records


def run(checkpoint: str, data: str | Path, out: str | Path, *, num: int = 200, max_tokens: int = 48,
        dtype: str | None = None) -> dict:
    """``dtype``: the engine's (default: ``refrag_vllm.engine.serving_dtype``); greedy answers
    can differ between dtypes, so the result records it."""
    from refrag_vllm import RefragPromptBuilder
    from refrag_vllm.engine import make_llm, serving_dtype

    path = Path(data)
    examples = read_jsonl(path / "qa_heldout.jsonl" if path.is_dir() else path,
                          required=("question", "answer", "passages"))[:num]
    builder = RefragPromptBuilder.from_pretrained(checkpoint)
    dtype = dtype or serving_dtype()
    rows, records = answer_and_score(make_llm(checkpoint, dtype=dtype), builder, examples, max_tokens)
    result = {"checkpoint": str(checkpoint), "data": str(data), "num_questions": len(examples),
              "max_tokens": max_tokens, "dtype": dtype, "rows": rows}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    (out / "qa_generation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "qa_generation.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"Greedy answers to {result['num_questions']} held-out questions ({result['data']}; engine in "
             f"{result.get('dtype', 'bfloat16')}); content recall = share of the reference answer's content words "
             "in the answer.", ""]

    def versus(r):
        if r["condition"] == CONDITIONS[0]:
            return "—"
        d = r["vs_no_passages"]
        return f"{d['mean']:+.3f} ± {d['se']:.3f} ({d['wins']} / {d['losses']})"

    lines += table_lines(
        ["Passages", "content recall", "vs no passages: mean ± s.e. (wins / losses)", "decoder positions"],
        [(r["condition"], f"{r['content_recall']:.3f}", versus(r), f"{r['positions']:.0f}") for r in result["rows"]])
    for r in result["rows"]:
        if "vs_control" in r:
            d = r["vs_control"]
            lines.append(f"\n{r['condition']} − its control ({CONTROLS[r['condition']]}): "
                         f"{d['mean']:+.3f} ± {d['se']:.3f} ({d['wins']} / {d['losses']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="prepared data folder (its qa_heldout.jsonl) or a QA jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--dtype", choices=DTYPES, help="the engine's dtype (default: bfloat16, or float32 on a CPU "
                   "without native bf16); the shipped numbers are bfloat16's")
    args = p.parse_args()
    print(markdown(run(args.checkpoint, args.data, args.out, num=args.num, max_tokens=args.max_tokens,
                       dtype=args.dtype)))


if __name__ == "__main__":
    main()
