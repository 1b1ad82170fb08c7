"""``infinito serve``: an OpenAI-compatible HTTP API and a playground over a checkpoint.

engine (ragged-batch decoding) -> batcher (the decode thread, bounded queue) -> app (FastAPI);
server is the command, loadtest the load generator. docs/serve.md describes the design.
"""
