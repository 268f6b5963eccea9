"""The DVC stage entry points, one module per stage in dvc.yaml (`python -m stages.NAME`): each reads its params
and inputs, calls the library in ``pipeline``, and writes its outputs. Importing ``pipeline`` first turns off
telemetry and pins MKL's numerics for the stage process (pipeline/__init__.py)."""

import pipeline  # noqa: F401
