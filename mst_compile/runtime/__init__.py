"""Training policy: what drives the ops of ``mst_compile.ops`` from an ordinary training loop.

``handle`` (``sm.mst``) owns the site table (``sites``) and the scheduler; the scheduler
(``scheduler``, which also checkpoints itself) calls the pure functions of
``schedule`` (step -> phase, target sparsity, drop fraction), ``topology`` (one Mixed-Growing
update) and ``density`` (how many weights each tensor keeps), and charges each step in
``ledger``; ``sharding`` accepts FSDP2 per block and refuses every other sharded layout, and ``fsdp``
runs MST on FSDP2's shards. Dependency rule:
imports ``ops``, never ``train``, ``export`` or ``passes``.
"""
