"""The ops a sparsified graph calls, and their kernels: no training policy lives here.

- ``sparse_linear``: the mask-carrying linear op (``mst::sparse_linear``) and ``SparseWeight``,
  the per-parameter module every use of a sparse weight calls;
- ``csr``: compressed kernels for that op on CPU, and the crossover that picks them;
- ``attention``: hybrid sparse attention (HSA), one switchable module per attention site;
  ``attention_kernels``, ``attention_residue`` and ``attention_cpu`` (C++ in ``csrc/``) compute it;
- ``dense_op``: a matmul that stayed dense, wrapped so the FLOP ledger can charge it.

Dependency rule: ``ops`` imports nothing from ``runtime``, ``train`` or ``export``; the runtime
changes an op's state (masks, patterns) only through the methods defined here.
"""
