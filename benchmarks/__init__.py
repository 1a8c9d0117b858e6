"""Speed benchmarks for refrag-vllm (``python -m benchmarks.ttft``)."""
