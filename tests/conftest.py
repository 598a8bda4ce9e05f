import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve a 2-core machine

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny test models: one thread is faster and steadier than two
