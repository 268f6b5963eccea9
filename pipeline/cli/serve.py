"""`legonet serve`: an HTTP scoring server (MLflow's protocol) that follows the champion and its quarantine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pipeline.errors import ParamsError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the champion over HTTP (MLflow's /invocations), following the registry")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--workers", type=int, default=1, help="worker processes, each following the alias by itself")
    p.add_argument("--alias", default="champion", help="the registry alias to follow (default champion)")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between two looks at the registry")
    p.add_argument("--tracking-uri", help="MLflow store (default: the project's, from params.yaml)")
    p.add_argument("--model", help="registered model name (default: the project's, from params.yaml)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request in the log")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: uvicorn, FastAPI and MLflow load only for `serve`
    import uvicorn

    from pipeline.project.params import load_params
    from pipeline.serve.app import settings_env
    from pipeline.tracking.lineage import absolute_store

    if args.workers < 1 or args.poll <= 0:
        raise ParamsError("--workers must be at least 1 and --poll above 0 seconds")
    tracking_uri, model = args.tracking_uri, args.model
    if tracking_uri is None or model is None:  # outside a project (a container) both must be given
        try:
            settings = load_params()["mlflow"]
        except ParamsError as exc:
            raise ParamsError(f"{exc}; outside a project give both --tracking-uri and --model") from exc
        tracking_uri = tracking_uri or absolute_store(str(settings["tracking_uri"]), Path.cwd())
        model = model or str(settings["registered_model"])
    os.environ.update(settings_env(tracking_uri, model, args.alias, args.poll))  # the workers' settings
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per load in the server's log
    uvicorn.run("pipeline.serve.app:app_from_environment", factory=True, host=args.host, port=args.port,
                workers=args.workers, access_log=not args.no_access_log, timeout_graceful_shutdown=30)
    return 0
