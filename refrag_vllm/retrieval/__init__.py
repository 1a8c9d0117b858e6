"""Retrieval for REFRAG: question -> passages -> cached chunk vectors.

* :mod:`.corpora`: reading corpora (jsonl with line-numbered errors) and real offline text;
* :mod:`.index`: the passage index (FAISS over sentence-transformers embeddings) and the
  REFRAG cache (each passage's projected chunk vectors, memory-mapped);
* :mod:`.rag`: :class:`~.rag.RefragRAG`, retrieval + a vLLM engine in one call;
* :mod:`.ray_index`: the same index built by Ray Data workers;
* :mod:`.batch_qa`: a jsonl of questions answered in one process or by Ray workers.
"""
