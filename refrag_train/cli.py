"""``refrag-train``: prepare data, run the stages, export, evaluate.

    refrag-train prepare --out data/python-docs
    refrag-train prepare --domain gcide --out data/gcide      # a second, held-out domain
    refrag-train prepare --domain kjv --out data/kjv          # a third, held-out domain: narrative prose
    refrag-train prepare --domain linux-doc --out data/linux-doc --max-train-chars 4000000  # another project's docs
    refrag-train prepare --domain fortunes --out data/fortunes  # general English, extra training prose
    refrag-train train   --config cpu --run-dir runs/cpu [--stages reconstruction,reading,sequence_reading,cpt,policy,sft] [--mlflow]
    refrag-train export  --config cpu --run-dir runs/cpu --out checkpoints/trained
    refrag-train eval    --config cpu --checkpoint checkpoints/trained --out runs/cpu/eval
    refrag-train recipe  --config cpu --run-dir runs/cpu [--ship]    # all of the above

Every stage is resumable: re-running the same command continues from the last save.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from refrag_vllm.config import chunk_size_arg
from refrag_vllm.delta import META, copy_delta

from .config import STAGES


def _config(args):
    import torch

    from .config import load_config

    cfg = load_config(args.config, getattr(args, "set", None))
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return cfg


def _data_dir(args, cfg) -> Path:
    return Path(getattr(args, "data", None) or cfg.data.dir)


def _record_time(run_dir: Path, what: str, seconds: float) -> None:
    path = run_dir / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {}
    timing[what] = round(seconds, 1)
    path.write_text(json.dumps(timing, indent=2) + "\n")


def cmd_prepare(args) -> None:
    try:
        manifest = _prepare_domain(args)
    except FileNotFoundError as e:  # a source or Debian package that is not there: say which, no traceback
        raise SystemExit(f"refrag-train prepare: error: {e}") from None
    print(json.dumps({k: v for k, v in manifest.items() if k != "description"}, indent=2))


def _prepare_domain(args) -> dict:
    if args.domain == "gcide":
        from .data.gcide import GCIDE_DIR, prepare_gcide

        return prepare_gcide(args.out, source=args.source or GCIDE_DIR, seed=args.seed)
    elif args.domain == "kjv":
        from .data.kjv import prepare_kjv

        return prepare_kjv(args.out, source=args.source)
    elif args.domain == "austen":
        from .data.austen import AUSTEN_DIR, prepare_austen

        return prepare_austen(args.out, source=args.source or AUSTEN_DIR,
                              heldout_fraction=args.heldout_fraction, seed=args.seed)
    elif args.domain == "fortunes":
        from .data.fortunes import FORTUNES_DIR, prepare_fortunes

        return prepare_fortunes(args.out, source=args.source or FORTUNES_DIR,
                                  heldout_fraction=args.heldout_fraction, seed=args.seed)
    else:
        from .data import EXCLUDED_DIRS, LINUX_DOC_EXCLUDED_DIRS, LINUX_DOC_SOURCES, prepare

        linux = args.domain == "linux-doc"
        return prepare(args.out, source=args.source or (LINUX_DOC_SOURCES if linux else None),
                       heldout_fraction=args.heldout_fraction, seed=args.seed,
                       excluded_dirs=EXCLUDED_DIRS + (LINUX_DOC_EXCLUDED_DIRS if linux else ()),
                       max_train_chars=args.max_train_chars)


def train_stages(cfg, run_dir: Path, data_dir: Path, stages, *, base_checkpoint=None, init: Path | None = None,
                 use_mlflow=False) -> Path:
    """Run ``stages`` in order; each starts from the previous stage's final weights, the first from
    ``init`` (a stage's ``final/`` folder, e.g. another run's) where it is given, whatever stages
    not named have finished in ``run_dir``."""
    from .cpt import train_cpt
    from .data import read_jsonl
    from .model import TrainingModel
    from .policy_rl import train_policy
    from .reading import STAGE_NAMES as READING_STAGES, train_reading
    from .reconstruction import train_reconstruction
    from .samples import TokenCorpus
    from .sft import train_sft

    for where, names in (("", stages), ("data.extra_train_stages: ", cfg.data.extra_train_stages)):
        unknown = set(names) - set(STAGES)
        if unknown:
            raise SystemExit(f"{where}unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    for folder in map(Path, cfg.data.extra_train):
        if not (folder / "train.jsonl").exists():
            raise SystemExit(f"data.extra_train: {folder}/train.jsonl is missing; prepare it with "
                             f"`refrag-train prepare --domain DOMAIN --out {folder}`")
    if init is not None:
        stage_weights(init, "--init")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    model = TrainingModel(cfg, base_checkpoint)
    corpora: dict[bool, TokenCorpus] = {}

    def corpus_for(stage: str) -> TokenCorpus:
        """``data.dir``'s training documents, with ``data.extra_train``'s where the stage reads them."""
        extra = bool(cfg.data.extra_train) and stage in cfg.data.extra_train_stages
        if extra not in corpora:
            folders = [data_dir, *map(Path, cfg.data.extra_train)] if extra else [data_dir]
            docs = [d for folder in folders for d in read_jsonl(folder / "train.jsonl")]
            cache = run_dir / ("train_tokens_extra.npz" if extra else "train_tokens.npz")
            corpora[extra] = TokenCorpus.cached([d["text"] for d in docs], model.tokenizer, cache)
            print(f"training corpus ({', '.join(map(str, folders))}): {len(docs)} documents, "
                  f"{corpora[extra].num_tokens} tokens")
        return corpora[extra]

    previous = init = Path(init) if init is not None else None
    final = None
    for name in STAGES:
        final_dir = run_dir / name / "final"
        if name not in stages:
            if init is None and (final_dir / "refrag_delta.json").exists():
                previous = final_dir
            continue
        if name in READING_STAGES and getattr(cfg, name).steps == 0:
            continue
        if (final_dir / "refrag_delta.json").exists():
            print(f"[{name}] already finished: {final_dir}")
            previous = final = final_dir
            continue
        if previous is not None and not (run_dir / name / "last").exists():
            model.load_delta_weights(previous)
        corpus = corpus_for(name) if name != "sft" or cfg.sft.replay_batch_size else None
        if name == "reconstruction":
            final = train_reconstruction(model, corpus, run_dir, use_mlflow=use_mlflow)
        elif name in READING_STAGES:
            final = train_reading(model, corpus, run_dir, name=name, use_mlflow=use_mlflow)
        elif name == "cpt":
            final = train_cpt(model, corpus, run_dir, use_mlflow=use_mlflow)
        elif name == "policy":
            final = train_policy(model, corpus, run_dir, use_mlflow=use_mlflow)
        else:
            examples = read_jsonl(data_dir / "qa_train.jsonl", required=("question", "answer", "passages"))
            final = train_sft(model, examples, run_dir, corpus, teacher_delta=previous, use_mlflow=use_mlflow)
        # The stage's own clock, summed over interrupted runs (trainer.Stage.elapsed_s).
        _record_time(run_dir, name, json.loads((final / "state.json").read_text())["elapsed_s"])
        previous = final
    if final is None and previous is None:
        raise SystemExit("no stage has finished yet")
    return final or previous


def cmd_train(args) -> None:
    cfg = _config(args)
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    final = train_stages(cfg, Path(args.run_dir), _data_dir(args, cfg), stages,
                         base_checkpoint=args.base_checkpoint, init=args.init, use_mlflow=args.mlflow)
    print(f"latest weights: {final}")


def stage_weights(folder: str | Path, flag: str) -> Path:
    """``folder`` if it holds a stage's weights (its ``refrag_delta.json``); else a refusal naming ``flag``."""
    folder = Path(folder)
    if not (folder / META).exists():
        raise SystemExit(f"{flag} {folder}: not a stage's weights (no {META})")
    return folder


def latest_delta(run_dir: Path) -> Path:
    for name in reversed(STAGES):
        final = run_dir / name / "final"
        if (final / "refrag_delta.json").exists():
            return final
    raise SystemExit(f"{run_dir}: no finished stage to export (run `refrag-train train` first)")


def cmd_export(args) -> Path:
    from .model import export_checkpoint

    cfg = _config(args)
    weights = stage_weights(args.delta, "--delta") if args.delta else latest_delta(Path(args.run_dir))
    # The shippable form (bf16, no optimizer state): export goes through exactly what ships.
    delta = copy_delta(weights, Path(args.run_dir) / "delta")
    out = export_checkpoint(cfg, delta, args.out, base_checkpoint=args.base_checkpoint, chunk_size=args.chunk_size)
    print(f"wrote checkpoint {out} from {delta}")
    return out


def cmd_eval(args) -> dict:
    from .data import read_jsonl
    from .evaluate import evaluate

    cfg = _config(args)
    data = _data_dir(args, cfg)
    docs = read_jsonl(data / "heldout.jsonl")
    qa_path = data / "qa_heldout.jsonl"  # absent or empty (a domain without questions): no QA table
    qa = read_jsonl(qa_path, required=("question", "answer", "passages"))[: args.qa_examples or None] \
        if qa_path.exists() and qa_path.stat().st_size else None
    result = evaluate(args.checkpoint, [d["text"] for d in docs], cfg.eval, args.out, qa_examples=qa,
                      seed=cfg.run.seed)
    print((Path(args.out) / "eval.md").read_text())
    return result


def cmd_recipe(args) -> None:
    """prepare (if needed) -> all stages -> export -> eval, timing each part."""
    cfg = _config(args)
    run_dir = Path(args.run_dir)
    data = _data_dir(args, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (data / "manifest.json").exists():
        started = time.time()
        from .data import prepare

        prepare(data, heldout_fraction=cfg.data.heldout_fraction, seed=cfg.run.seed)
        _record_time(run_dir, "prepare", time.time() - started)
    train_stages(cfg, run_dir, data, STAGES, base_checkpoint=args.base_checkpoint, use_mlflow=args.mlflow)
    started = time.time()
    args.out = str(run_dir / "checkpoint")
    cmd_export(args)
    _record_time(run_dir, "export", time.time() - started)
    started = time.time()
    args.checkpoint, args.out = str(run_dir / "checkpoint"), str(run_dir / "eval")
    cmd_eval(args)
    _record_time(run_dir, "eval", time.time() - started)
    from .plots import plot_training

    plot_training(run_dir, run_dir / "eval" / "training_curves.png")
    timing = json.loads((run_dir / "timing.json").read_text())
    print(f"wall time (s): {timing}, total {sum(timing.values()):.0f}")
    if args.ship:
        from refrag_vllm.delta import SHIPPED_DELTA

        ship = copy_delta(run_dir / "delta", SHIPPED_DELTA)
        for name in ("eval.md", "eval.json", "training_curves.png", "content_by_position.png"):
            if (run_dir / "eval" / name).exists():  # the plot needs Table 1 with its controls
                shutil.copy2(run_dir / "eval" / name, ship / name)
        shutil.copy2(run_dir / "timing.json", ship / "timing.json")
        print(f"shipped delta to {ship}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="refrag-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", help="jsonl train/held-out documents and QA from the Python docs "
                                       "(or a held-out second domain)")
    p.add_argument("--out", default="data/python-docs")
    p.add_argument("--domain", choices=("python-docs", "linux-doc", "fortunes", "austen", "gcide", "kjv"), default="python-docs",
                   help="linux-doc: the kernel's reST documentation (apt-get install linux-doc), "
                        "extra training prose or held-out software documentation; fortunes: general "
                        "English (apt-get install fortunes), extra training prose; austen: Jane Austen's novels "
                        "(apt-get install r-cran-janeaustenr), extra training narrative; gcide: English "
                        "dictionary prose (apt-get install dict-gcide), evaluation only; kjv: the King "
                        "James Bible's narrative prose (apt-get install bible-kjv), evaluation only")
    p.add_argument("--source", default=None, help="reST sources (default: python3-doc's html/_sources), "
                                                  "or with --domain gcide/fortunes/austen their data folder, "
                                                  "or with --domain kjv a file of `bible -l1000 Gen1:1-Rev22:21` output")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--max-train-chars", type=int, default=None,
                   help="keep about this many characters of training documents (a hash-ordered spread)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_prepare)

    def common(p, run_dir=True):
        p.add_argument("--config", default="cpu", help="TOML file or shipped name (cpu, cpu_minilm, gpu, probe, tiny)")
        p.add_argument("--data", default=None, help="prepared data folder (default: the config's data.dir)")
        p.add_argument("--base-checkpoint", default=None, help="start from this REFRAG checkpoint")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (a TOML value), e.g. --set reconstruction.lr=3e-3")
        if run_dir:
            p.add_argument("--run-dir", required=True)

    p = sub.add_parser("train", help="run training stages (resumable)")
    common(p)
    p.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--mlflow", action="store_true", help="also log to MLflow (./RUN_DIR/../mlruns)")
    p.add_argument("--init", default=None, metavar="STAGE_FINAL",
                   help="start the first stage named from these weights (a stage's final/ folder), not from "
                        "stages finished in RUN_DIR, e.g. to continue a finished stage in a new run; "
                        "refused before anything is written if it is not a stage's weights")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="write a servable checkpoint from a run's latest weights")
    common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--chunk-size", type=chunk_size_arg, default=None, metavar="K",
                   help="the k the checkpoint serves at (default: the k the weights were trained for)")
    p.add_argument("--delta", help="export these stage weights instead of the run's latest, e.g. "
                   "RUN/reconstruction/final or refrag_train/stage_weights/cpu-reading/reading/final")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="Table-1-style log-perplexity evaluation of a checkpoint")
    common(p, run_dir=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--qa-examples", type=int, default=64, help="held-out QA questions scored (0: all)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("recipe", help="prepare + train all stages + export + eval")
    common(p)
    p.add_argument("--mlflow", action="store_true")
    p.add_argument("--qa-examples", type=int, default=64, help="held-out QA questions scored (0: all)")
    p.add_argument("--ship", action="store_true", help="copy the delta into refrag_vllm/weights/ (default model)")
    p.set_defaults(fn=cmd_recipe)

    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
