"""Two arms' answers to the same held-out questions, paired question by question.

    python -m refrag_train.compare_arms RUN RUN_CONTROL [--eval eval-qa518] [--answers qa-python] [--out FILE.md]
    python -m refrag_train.compare_arms RUN RUN_CONTROL --eval eval-gcide   # Table 1, paired window by window

Each run folder holds what ``refrag-train eval`` (``RUN/<eval>/eval.json``, its QA table's
per-question answer log-PPL) and ``python -m refrag_train.qa_generation``
(``RUN/<answers>/answers.jsonl``, the greedy answers) wrote for the same questions. For every
condition both arms have (no passages, compressed, raw, the control), the table gives RUN −
RUN_CONTROL paired over the questions: mean ± standard error, and on how many questions RUN is
better and worse (a lower log-PPL, a higher content recall). A change that helps the compressed
answers and not their control, without costing the no-passages ones, shows as such here even
when the *recovered* share, a ratio of three rows, hides it.

Where the eval folder holds Table 1 (``refrag-train eval`` with windows), its rows are paired
the same way over the windows, with one more row: the content, another window's chunks minus
REFRAG-k (the served chunk size) per window, where a positive difference means RUN's compressed
chunks carry more; the QA table gets the same row per question (another question's compressed
passages minus the question's own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from refrag_vllm.markdown import table_lines

from .data import read_jsonl
from .evaluate import QA_COMPRESSED, QA_CONTROL, window_content
from .qa_generation import content_recall, paired_difference

ANSWER_FIELDS = ("id", "question", "reference")


def answer_log_ppl(eval_dir: Path) -> dict[str, list[float]]:
    """``{condition: per-question answer log-PPL}`` of an eval folder's QA table."""
    rows = json.loads((eval_dir / "eval.json").read_text()).get("qa", [])
    return {r["condition"]: r["per_example"] for r in rows}


def answer_content(rows: dict[str, list[float]]) -> dict[str, list[float]]:
    """``{"content (control − compressed)": per question}``: the answer's log-PPL after another
    question's compressed passages minus after its own, in nats (higher: the passages carry more);
    ``{}`` without the control."""
    if QA_CONTROL not in rows or QA_COMPRESSED not in rows:
        return {}
    return {"content (control − compressed)":
            [c - t for c, t in zip(rows[QA_CONTROL], rows[QA_COMPRESSED])]}


def window_log_ppl(eval_dir: Path) -> dict[str, list[float]]:
    """``{condition: per-window log-PPL}`` of an eval folder's Table 1; ``{}`` without one."""
    rows = json.loads((eval_dir / "eval.json").read_text()).get("rows", [])
    return {r["condition"]: r["per_window"] for r in rows}


def answer_recall(answers_dir: Path) -> tuple[list[str], dict[str, list[float]]]:
    """The questions and ``{condition: per-question content recall}`` of greedy answers."""
    rows = read_jsonl(answers_dir / "answers.jsonl", required=("question", "reference"))
    conditions = [k for k in rows[0] if k not in ANSWER_FIELDS]
    return ([r["question"] for r in rows],
            {c: [content_recall(r[c], r["reference"]) for r in rows] for c in conditions})


def paired_rows(ours: dict[str, list[float]], theirs: dict[str, list[float]], lower_is_better: bool) -> list[dict]:
    """One row per condition both arms have: ours − theirs, and the questions it is better / worse on."""
    out = []
    for condition in (c for c in ours if c in theirs):
        d = paired_difference(ours[condition], theirs[condition])
        better, worse = (d["losses"], d["wins"]) if lower_is_better else (d["wins"], d["losses"])
        out.append({"condition": condition, "mean": d["mean"], "se": d["se"], "better": better, "worse": worse})
    return out


def _same_length(ours: dict[str, list], theirs: dict[str, list], eval_name: str, what: str) -> None:
    if any(len(ours[c]) != len(theirs[c]) for c in ours if c in theirs):
        raise ValueError(f"{eval_name}: the two arms scored different numbers of {what}")


def compare(run: Path, control: Path, eval_name: str = "eval-qa518", answers_name: str = "qa-python") -> dict:
    """Paired differences of ``run`` against ``control``; a part missing from either is left out."""
    result: dict = {"run": str(run), "control": str(control)}
    if (run / eval_name / "eval.json").exists() and (control / eval_name / "eval.json").exists():
        ours, theirs = window_log_ppl(run / eval_name), window_log_ppl(control / eval_name)
        if ours and theirs:
            _same_length(ours, theirs, eval_name, "windows")
            result["window_log_ppl"] = (paired_rows(ours, theirs, lower_is_better=True)
                                        + paired_rows(window_content(ours), window_content(theirs), lower_is_better=False))
        ours, theirs = answer_log_ppl(run / eval_name), answer_log_ppl(control / eval_name)
        if ours and theirs:
            _same_length(ours, theirs, eval_name, "questions")
            result["answer_log_ppl"] = (paired_rows(ours, theirs, lower_is_better=True)
                                        + paired_rows(answer_content(ours), answer_content(theirs), lower_is_better=False))
    if (run / answers_name / "answers.jsonl").exists() and (control / answers_name / "answers.jsonl").exists():
        (q_ours, ours), (q_theirs, theirs) = answer_recall(run / answers_name), answer_recall(control / answers_name)
        if q_ours != q_theirs:
            raise ValueError(f"{answers_name}: the two arms answered different questions")
        result["greedy_recall"] = paired_rows(ours, theirs, lower_is_better=False)
    return result


def markdown(result: dict) -> str:
    lines = [f"{result['run']} − {result['control']}, paired over the same held-out windows and questions.", ""]
    for key, title in (("window_log_ppl", "Table 1 log-PPL, paired over the windows (lower: better; content: higher)"),
                       ("answer_log_ppl", "QA answer log-PPL (lower: better; content: higher)"),
                       ("greedy_recall", "greedy content recall (higher: better)")):
        if key in result:
            lines += table_lines([title, "mean ± s.e.", "better / worse"],
                                 [(r["condition"], f"{r['mean']:+.3f} ± {r['se']:.3f}", f"{r['better']} / {r['worse']}")
                                  for r in result[key]])
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the arm")
    p.add_argument("control", type=Path, help="its control arm")
    p.add_argument("--eval", default="eval-qa518", help="the eval folder inside each run")
    p.add_argument("--answers", default="qa-python", help="the qa_generation folder inside each run")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    result = compare(args.run, args.control, args.eval, args.answers)
    if len(result) == 2:
        raise SystemExit(f"{args.run} and {args.control} share no {args.eval}/eval.json nor {args.answers}/answers.jsonl")
    text = markdown(result)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
