"""``refrag-vllm index --ray``: the embeddings and the REFRAG cache computed by Ray Data
workers over shards of the corpus, merged by the driver into the same on-disk index.

The workers run the same :class:`~refrag_vllm.retrieval.index.Retriever` and
:class:`~refrag_vllm.retrieval.index.CacheProjector` as the single-process build; the driver
receives their batches in corpus order and commits them with the same
:class:`~refrag_vllm.retrieval.index.IndexWriter`, so both builds give the same ids in the same
order and the same vectors (to floating-point tolerance: batches differ).

Cluster: ``address=None`` uses ``RAY_ADDRESS`` if set, else starts a local Ray on this
machine.  On a multi-node cluster, start Ray there (``ray start --head`` on one node,
``ray start --address HEAD:6379`` on the others), then run the same command with
``--ray-address ray://HEAD:10001`` (or ``RAY_ADDRESS``); the workers need this package
and the checkpoint at the same path on every node.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .index import (RETRIEVER_MAX_TOKENS, CacheProjector, IndexWriter, PassageIndex, PassageRecord, Retriever,
                    cache_identity, new_records, read_corpus, retriever_spec)


class EmbedPassages:
    """A Ray Data actor: ``{"id", "text"}`` batches -> retrieval vector + cache rows."""

    def __init__(self, model_dir: str, retriever: dict) -> None:
        import torch

        torch.set_num_threads(1)
        self.retriever = Retriever.from_spec(retriever)
        self.projector = CacheProjector(model_dir)

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"]]
        chunks = self.projector.project(texts)
        return {"id": batch["id"], "text": batch["text"], "vector": self.retriever.embed(texts),
                "num_chunks": np.array([c.shape[0] for c in chunks], dtype=np.int64),
                "chunks": np.array([c.astype(np.float32).tobytes() for c in chunks], dtype=object)}


def init_ray(address: str | None = None, env_vars: dict | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)


def build_index_ray(corpus: str | Path, out: str | Path, model_dir: str | Path, *, retriever: str | None = None,
                    retriever_max_tokens: int = RETRIEVER_MAX_TOKENS, batch_size: int = 64, num_workers: int = 2,
                    address: str | None = None, progress: bool = True) -> PassageIndex:
    """Like :func:`~refrag_vllm.retrieval.index.build_index`, with the embedding done by Ray Data."""
    import ray
    from tqdm import tqdm

    records = read_corpus(corpus)
    identity = cache_identity(model_dir)
    spec = retriever_spec(retriever, retriever_max_tokens)
    writer = IndexWriter(out, identity, spec)
    todo = new_records(records, writer.known)
    if todo:
        init_ray(address)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the driver commits in corpus order
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{"id": r.id, "text": r.text} for r in todo],
                                 override_num_blocks=max(1, min(len(todo) // batch_size, num_workers * 4)))
        ds = ds.map_batches(EmbedPassages, fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()),
                                                                  "retriever": spec},
                            batch_size=batch_size, batch_format="numpy", concurrency=num_workers, num_cpus=1)
        width = identity["width"]
        with tqdm(total=len(todo), desc="indexing (ray)", unit="passage", disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                recs = [PassageRecord(str(i), str(t)) for i, t in zip(batch["id"], batch["text"])]
                chunks = [np.frombuffer(b, dtype=np.float32).reshape(int(n), width)
                          for b, n in zip(batch["chunks"], batch["num_chunks"])]
                writer.add(recs, np.asarray(batch["vector"], dtype=np.float32), chunks)
                bar.update(len(recs))
    return PassageIndex.open(out)
