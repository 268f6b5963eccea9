"""legonet: exact machine unlearning as a DVC + MLflow pipeline (docs/design.md).

Subpackages, one idea each: ``model`` (the math: encoder, keys, routing, adapters, ensemble, probe, package; no
DVC or MLflow), ``data`` (tables, contracts, quality), ``project`` (layout, params, init), ``runner`` (stages in
DVC's order, in process or on Ray), ``tracking`` (MLflow lineage and registry), ``forget`` (the journalled flow),
``purge`` (stores), ``audit`` (the signed log), ``cli`` (the `legonet` command).

Importing it sets two things for this process and every process it starts, before anything they govern runs:

- MKL's conditional numerical reproducibility (``MKL_CBWR=AVX2,STRICT``), before torch runs its first kernel.
  MKL otherwise picks its code path by CPU and thread count, and those bits reach the artifacts (the exported
  encoder's folded convolution weights and adapter matmuls differed with and without it). It is set, not
  defaulted: a different value in the caller's environment would silently give other artifacts than a
  from-scratch build elsewhere (docs/design.md, determinism).
- No telemetry: a privacy tool sends no usage data anywhere. MLflow (``MLFLOW_DISABLE_TELEMETRY``,
  ``DO_NOT_TRACK``), Great Expectations (``GX_ANALYTICS_ENABLED``) and DVC (``DVC_NO_ANALYTICS``; projects also
  get ``core.analytics false`` in .dvc/config) are turned off before any of them is imported, and the child
  processes legonet starts (`dvc`, `git`, DVC's stage commands) inherit it.
"""

import os

TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "GX_ANALYTICS_ENABLED": "false",
                 "DVC_NO_ANALYTICS": "1"}
os.environ.update(TELEMETRY_OFF)
os.environ["MKL_CBWR"] = "AVX2,STRICT"
