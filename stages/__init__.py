"""The `legonet` CLI and the DVC stage scripts.

A privacy tool sends no usage data anywhere. Every legonet process (the CLI, and each stage DVC runs, since
`python -m stages.X` imports this package first) turns off the telemetry of the tools it drives before any of
them is imported, and the child processes it starts (`dvc`, `git`) inherit the setting:
MLflow (MLFLOW_DISABLE_TELEMETRY, DO_NOT_TRACK; on by default since MLflow 3.2), Great Expectations
(GX_ANALYTICS_ENABLED) and DVC (DVC_NO_ANALYTICS; projects also get `core.analytics false` and
`core.check_update false` in .dvc/config, so a plain `dvc` command in the project stays quiet too).
"""

import os

TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "GX_ANALYTICS_ENABLED": "false",
                 "DVC_NO_ANALYTICS": "1"}
os.environ.update(TELEMETRY_OFF)
