"""Integrations with training frameworks people already use (import each submodule explicitly).

- ``mst_compile.integrations.transformers.MSTCallback``: MST inside a Hugging Face ``Trainer``.
"""
