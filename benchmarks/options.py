"""What the benchmark commands share: a profile dataclass as flags, and the run's log file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def profile_parser(doc: str, out_help: str, quick_help: str, cls) -> argparse.ArgumentParser:
    """``--model``, ``--out``, ``--quick`` and one flag per field of the profile dataclass ``cls``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a REFRAG checkpoint folder")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    add_profile_flags(parser, cls)
    return parser


def add_profile_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per field of the dataclass ``cls`` (unset: the profile's value)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.type == "list[int]":
            parser.add_argument(flag, type=lambda s: [int(x) for x in s.split(",") if x != ""], default=None)
        else:
            parser.add_argument(flag, type={"float": float, "str": str}.get(f.type, int), default=None)


def profile_dtype(cfg) -> str:
    """The profile's ``dtype`` field, or where it is empty the dtype the engines pick on this
    machine (:func:`refrag_vllm.engine.serving_dtype`)."""
    from refrag_vllm.engine import serving_dtype

    return cfg.dtype or serving_dtype()


def profile_from_args(args: argparse.Namespace, profiles: dict):
    """A copy of ``profiles["quick"]`` (with ``--quick``) or ``profiles["default"]``, with
    every flag the command line set."""
    cfg = dataclasses.replace(profiles["quick" if args.quick else "default"])
    for f in dataclasses.fields(cfg):
        value = getattr(args, f.name)
        if value is not None:
            setattr(cfg, f.name, value)
    return cfg


def parse_profile(parser: argparse.ArgumentParser, argv, profiles: dict):
    """``(args, cfg)``: the parsed command line and the profile it picks (:func:`profile_from_args`)."""
    args = parser.parse_args(argv)
    return args, profile_from_args(args, profiles)


def run_log(out: Path):
    """``log(msg)``: print it and append it to ``out/log.txt`` (``out`` is created)."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    return log


def write_result(out: str | Path, name: str, result: dict, markdown: str) -> None:
    """``out/name.json`` and ``out/name.md`` (``out`` is created); the markdown is printed too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def timed_calls(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn()``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
