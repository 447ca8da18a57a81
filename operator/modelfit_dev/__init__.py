"""Development tools beside the operator, never shipped in its package or image.

- ``synth``: GGUF files with real architectures and tensor shapes and generated weights (no downloads).
- ``probe``: runs the real llama-server and measures what it uses (RSS, VmHWM, timings).

Tests, e2e scenarios, benchmarks and the demo import them with ``operator/`` on ``PYTHONPATH``;
``modelfit`` never imports them (an import-linter contract).
"""
