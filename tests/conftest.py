import os

# Tiny test models run faster and steadier on one thread, and subprocesses inherit the same setting
# (results that compare an in-process run with a subprocess run need the same thread count).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a 2-core machine

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
