"""Benchmarks of legonet: unlearning speed and accuracy against full retraining and SISA (issue 5).

Everything here calls the pipeline's own functions (splits, encoder, projection, keys, routing, adapter training,
ensemble), so the numbers describe the product. ``python -m bench --help`` lists the modes.
"""

from __future__ import annotations
