"""Benchmarks of legonet: unlearning speed and accuracy against full retraining and SISA (issue 5).

Everything here calls the pipeline's own functions (splits, encoder, projection, keys, routing, adapter training,
ensemble), so the numbers describe the product. ``python -m bench --help`` lists the modes.
"""

from __future__ import annotations

import os

# Before anything imports torch: adapter training is thread-independent only under this MKL setting
# (DESIGN.md section 8), exactly as the pipeline's stages set it.
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
