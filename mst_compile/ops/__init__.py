"""The ops a sparsified graph calls, and their kernels: no training policy lives here.

- ``sparse_linear``: the mask-carrying linear op (``mst::sparse_linear``) and ``SparseWeight``,
  the per-parameter module every use of a sparse weight calls;
- ``csr``: compressed kernels for that op on CPU, and the choice between them and the masked-dense op;
- ``crossovers``: the measured densities below which the CPU sparse kernels beat dense
  (``kernel_crossovers.json``, written by ``benchmarks/csr_kernels.py --package`` and ``benchmarks/tiles.py --package``);
- ``attention``: hybrid sparse attention (HSA), one switchable module per attention site;
  ``attention_kernels``, ``attention_residue`` and ``attention_cpu`` (C++ in ``csrc/``) compute it;
- ``dense_op``: a matmul that stayed dense, wrapped so the FLOP ledger can charge it.

Dependency rule: ``ops`` imports nothing from ``runtime``, ``train`` or ``export``; the runtime
changes an op's state (masks, patterns) only through the methods defined here.
"""
