"""The constants every layer shares, defined once: phases, attention patterns, kernel names, the default
stride, the module names the passes give their sites, and what counts as a blocked mask entry.

Config validation, the ops, the passes, export, the trainer's reports and the CLI all read them from
here, so a new pattern or kernel is added in one place. Imports nothing (no torch): the CLI checks
flags against these names before paying for ``import torch``.
"""
from __future__ import annotations

PHASES = ("warmup", "ultra", "restoration")
ATTENTION_PATTERNS = ("dense", "local", "strided", "sparse")  # docs/design.md §5
DISTRIBUTIONS = ("uniform", "er")  # docs/design.md §2
SPARSE_KERNELS = ("auto", "dense", "csr", "tile", "triton")  # MSTConfig.sparse_kernel: "auto" picks one of LINEAR_KERNELS
# what a sparse weight site runs: the masked-dense op, CSR kernels (unstructured masks, CPU), or the kernels
# that skip inactive tiles (tile-structured masks): the blocked CPU kernel ("tile") or Triton ("triton")
LINEAR_KERNELS = ("dense", "csr", "tile", "triton")
TILE_KERNELS = ("tile", "triton")  # the settings that need tile-structured masks (MSTConfig.tile)
TILES = (8, 16, 32, 64, 128)  # MSTConfig.tile: the tile edges masks can be structured by
LR_SCHEDULES = ("cosine", "wsd")
LR_DENSITY_SCOPES = ("run", "weight")  # MSTConfig.lr_density_scope: one density for the run, or each weight's own
DEFAULT_LR_DECAY = 0.2  # the WSD decay tail of a run without a restoration phase (ultra_end = 1)
ATTENTION_RESTORES = ("switch", "widen")
RESTORATION_SHAPES = ("late", "linear", "early")

# HSA stride: the published default l = T/8 of the running sequence length (docs/design.md §5).
STRIDE_DIVISOR = 8


def default_stride(T: int) -> int:
    """The default stride l = T/8 (128 at T = 1024), at least 1."""
    return max(1, T // STRIDE_DIVISOR)


# Submodules of a sparsified GraphModule that hold the rewritten sites (call_module targets
# "<container>.<slot>"): the passes create them, the runtime and export find the sites by them.
SPARSE_CONTAINER = "mst_sites"  # one SparseWeight per sparse parameter (passes/linear.py)
ATTENTION_CONTAINER = "mst_attn"  # one HybridSparseAttention per attention site (passes/attention.py)
DENSE_CONTAINER = "mst_dense"  # matmuls left dense, wrapped so the ledger charges them (passes/dense.py)
BLOCKS_META = "mst_blocks"  # sm.meta key: the blocks' ModuleList path of a per-block capture (capture_blocks.py)
SHAPES_META = "mst_shapes_only"  # placeholder meta of a block cut from an exported graph: its value follows from shapes only
WHOLE_META = "mst_whole_why"  # sm.meta key: why blocks="auto" captured the model whole (capture_blocks.py)

# Additive attention masks: an entry at or below this blocks its key. exp(-1e4) is 0 in every float
# dtype, so such an entry removes the key exactly; models write -inf, the dtype's minimum (Hugging
# Face) or -1e4 (older GPT-2 code, fp16-safe), and all three must read as blocked.
MASK_BLOCKED = -1e4


def blocks(value):
    """True where an additive mask entry blocks its key: a number, or elementwise on a tensor."""
    return value <= MASK_BLOCKED


UNCOUNTED = "its FLOPs are not counted"  # said by a skipped site whose work the ledger cannot see
