"""Engines the operators run on: vLLM through ray.data.llm, and Lucene BM25 through pyserini."""
