"""Helpers for tests and CPU-only demos: never imported by the training path.

``megatron_cpu`` replaces three CUDA assumptions of Megatron-Core 0.19 *in the calling process*
(on request only); ``tiny_gpt`` builds the small GPT models the tests and the demo use.
"""
