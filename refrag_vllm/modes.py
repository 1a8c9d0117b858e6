"""How the retrieved passages of a prompt reach the decoder: one name per way, shared by the RAG
client, the command line and the benchmarks.

* ``vanilla``        the passages as raw tokens (vanilla RAG; one decoder position per token);
* ``refrag``         the passages as chunk text; the engine encodes and projects every chunk
  (through its chunk-vector cache), so any client that sends text gets it;
* ``refrag-cached``  the passages' projected chunk vectors, precomputed by the REFRAG cache of an
  index and sent with the prompt (no encoder work at query time);
* ``refrag-policy``  chunk text, with the checkpoint's expansion policy keeping some chunks raw.
"""

VANILLA = "vanilla"
REFRAG = "refrag"
REFRAG_CACHED = "refrag-cached"
REFRAG_POLICY = "refrag-policy"

MODES = (VANILLA, REFRAG, REFRAG_CACHED, REFRAG_POLICY)
