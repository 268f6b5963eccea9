"""legonet's library: the math of exact unlearning, with no CLI or DVC knowledge.

Importing it pins MKL's conditional numerical reproducibility (``MKL_CBWR=AVX2,STRICT``) for this process and the
processes it starts, before torch runs its first kernel. MKL otherwise picks its code path by CPU and thread count,
and those bits reach the artifacts: the exported encoder's folded convolution weights differed in their last bits
with and without it (so a build in a shell that happened to set it did not equal one that did not), and adapter
matmuls differed between 1 and 2 threads (DESIGN.md section 8). It is set, not defaulted: a different value in the
caller's environment would silently give other artifacts than a from-scratch build elsewhere.
"""

import os

os.environ["MKL_CBWR"] = "AVX2,STRICT"
