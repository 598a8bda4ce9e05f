"""Integrations with training frameworks people already use (import each submodule explicitly).

- ``mst_compile.integrations.transformers.MSTCallback``: MST inside a Hugging Face ``Trainer``;
  importing the module registers the ``mst_hsa`` attention (``hf_attention``) that exported folders use.
"""
