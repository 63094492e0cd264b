"""Load tests of the service: `ftllm bench serve` (`bench_serve`) and the peer server it is
compared with, `transformers serve --continuous-batching` (`serve_peer`).

Kept apart from the CLI package, which only parses the command line and calls
`bench_serve.bench_serve_command`, and out of the bento (its `include` takes
`serving/*.py`, not this folder).
"""
