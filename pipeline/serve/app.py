"""The HTTP app of `legonet serve`: MLflow's scoring protocol, answered by the version the follower serves.

``/invocations`` is MLflow's own scoring function (``mlflow.pyfunc.scoring_server.invocations``): the same request
formats (JSON ``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs`` with optional ``params``; CSV;
Parquet), the same ``{"predictions": ...}`` response and the same error bodies as `mlflow models serve`. Every call
gets the serving version's quarantine in its ``quarantine`` param (a client's own list is added to it, never
replaces it), and the response names the version and the quarantine in headers. ``/ping`` is 200 once a model
serves; ``/health`` says what serves and what went wrong since (a failed load, an unreachable registry); ``/version``
names the version, its run, its quarantine and the audit checkpoint it carries.

Each worker process builds its own app and follower from ``LEGONET_SERVE_*`` variables (``settings_env``), as
uvicorn's workers import the app by name.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pipeline.model.signature import QUARANTINE_PARAM
from pipeline.serve.follower import Follower, Served

VERSION_HEADER = "X-Legonet-Model-Version"
QUARANTINE_HEADER = "X-Legonet-Quarantine"
ENV = {"tracking_uri": "LEGONET_SERVE_TRACKING_URI", "model": "LEGONET_SERVE_MODEL",
       "alias": "LEGONET_SERVE_ALIAS", "poll": "LEGONET_SERVE_POLL"}


def settings_env(tracking_uri: str, model: str, alias: str, poll: float) -> dict[str, str]:
    """The variables a worker process reads its settings from (``app_from_environment``)."""
    values = {"tracking_uri": tracking_uri, "model": model, "alias": alias, "poll": str(poll)}
    return {ENV[key]: value for key, value in values.items()}


def app_from_environment() -> FastAPI:
    """uvicorn's app factory in each worker: one follower per process, each following the alias by itself."""
    missing = [name for name in ENV.values() if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"`legonet serve` sets {', '.join(missing)} for its workers; start it with `legonet serve`")
    return create_app(Follower(os.environ[ENV["tracking_uri"]], os.environ[ENV["model"]],
                               os.environ[ENV["alias"]], float(os.environ[ENV["poll"]])))


class QuarantinedModel:
    """What MLflow's scoring function predicts with: the served model, the quarantine in every call's params."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.metadata = served.model.metadata

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        # lazy: mlflow is imported by the follower before any request; here only for its error type
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        if not _declares_quarantine(self.served):  # an older version: served only while nothing is quarantined
            return self.served.model.predict(data, params=params)
        params = dict(params or {})
        asked = params.get(QUARANTINE_PARAM) or []
        try:
            extra = {int(a) for a in (asked if isinstance(asked, list) else [asked])}
        except (TypeError, ValueError) as exc:
            raise MlflowException(f"params.{QUARANTINE_PARAM} must list adapter numbers: {exc}",
                                  error_code=BAD_REQUEST) from exc
        params[QUARANTINE_PARAM] = sorted(self.served.quarantine | extra)
        return self.served.model.predict(data, params=params)


def _declares_quarantine(served: Served) -> bool:
    schema = served.model.metadata.get_params_schema()
    return schema is not None and any(spec.name == QUARANTINE_PARAM for spec in schema.params)


def _refusal(served: Served | None) -> str | None:
    """Why no prediction may be made now, or None."""
    if served is None:
        return "no model version serves yet (see /health)"
    if served.refusal:
        return served.refusal
    if served.quarantine and not _declares_quarantine(served):
        return (f"model version {served.version} has no `{QUARANTINE_PARAM}` param (packaged before quarantines "
                f"existed) and adapters {sorted(served.quarantine)} are quarantined: build a new version")
    return None


def _headers(served: Served) -> dict[str, str]:
    return {VERSION_HEADER: served.version, QUARANTINE_HEADER: ",".join(map(str, sorted(served.quarantine)))}


def _unavailable(message: str) -> Response:
    return JSONResponse({"error_code": "TEMPORARILY_UNAVAILABLE", "message": message}, status_code=503)


def describe(served: Served | None) -> dict[str, Any] | None:
    if served is None:
        return None
    return {"version": served.version, "run_id": served.run_id, "loaded_at": served.loaded_at,
            "quarantine": {"adapters": sorted(served.quarantine), "tag": served.quarantine_tag},
            "audit_checkpoint": served.checkpoint, "refusal": _refusal(served)}


def create_app(follower: Follower) -> FastAPI:
    """The app over ``follower``; its lifespan starts the follower (first model loaded) and stops it."""
    # lazy: MLflow's scoring server imports MLflow (seconds); only a server needs it
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import invocations as score
    from mlflow.version import VERSION as MLFLOW_VERSION

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(follower.start)
        yield
        await asyncio.to_thread(follower.stop)

    app = FastAPI(title="legonet serve", lifespan=lifespan)

    @app.get("/ping")
    async def ping() -> Response:
        served = follower.current
        return Response("\n", status_code=200 if served is not None else 503, media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        served, status = follower.current, follower.status
        problems = [p for p in (status.registry_error and f"registry: {status.registry_error}",
                                status.load_failure and f"version {status.load_failure['version']} failed to load",
                                _refusal(served)) if p]
        body = {"status": "ok" if not problems else "degraded" if served is not None else "unavailable",
                "problems": problems, "model": follower.name, "alias": follower.alias, "serving": describe(served),
                "loading": status.loading, "load_failure": status.load_failure, "polled_at": status.polled_at}
        return JSONResponse(body, status_code=200 if served is not None else 503)

    @app.get("/version")
    async def version() -> Response:
        served = follower.current
        body = {"model": follower.name, "alias": follower.alias, **(describe(served) or {"version": None}),
                "mlflow_version": MLFLOW_VERSION}
        return JSONResponse(body, status_code=200 if served is not None else 503,
                            headers=_headers(served) if served is not None else None)

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        served = follower.current  # this request's version, whatever swaps while it runs
        refusal = _refusal(served)
        if served is None or refusal:
            return _unavailable(refusal or "")
        data = await request.body()
        content_type = request.headers.get("content-type", "")
        try:
            result = await asyncio.to_thread(score, data, content_type, QuarantinedModel(served),
                                             served.model.metadata.get_input_schema())
        except MlflowException as exc:
            return Response(exc.serialize_as_json(), status_code=exc.get_http_status_code(),
                            media_type="application/json", headers=_headers(served))
        return Response(result.response, status_code=result.status, media_type=result.mimetype,
                        headers=_headers(served))

    return app
