"""Follow a registry alias: which version serves, with which quarantine, swapped without stopping a request.

A poller thread asks the registry every ``poll`` seconds for the alias's version and its tags (one cheap call; a
second for the serving version's own tags while another one loads). A quarantine change of the serving version
applies at the next poll, no reload. A new version loads in a loader thread; when it is ready, one reference
assignment (``self.current``) swaps it in: a request holds the ``Served`` it started with, so nothing in flight
fails or is dropped, and the old model is freed when the last such request ends. A version that fails to load
leaves the old one serving; the failure is reported on /health and retried after ``retry`` seconds or when the
alias moves again. A registry that does not answer leaves everything as it was (reported on /health too).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import QuarantineUnreadable
from pipeline.runner.build import CHECKPOINT_TAG
from pipeline.tracking import quarantine

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: the server's own log lines


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Served:
    """One version as it serves: the loaded model and what the registry says of it. Never changed in place."""

    version: str
    model: Any  # mlflow.pyfunc.PyFuncModel
    run_id: str | None
    quarantine: frozenset[int]
    quarantine_tag: dict[str, Any] | None
    checkpoint: str | None
    loaded_at: str
    refusal: str | None = None  # why it must not predict now (its quarantine tag is unreadable)


@dataclass
class Status:
    """What /health reports beside the serving version: the last registry error and load failure."""

    registry_error: str | None = None
    loading: str | None = None
    load_failure: dict[str, str] | None = None
    polled_at: str | None = None
    failed_at: dict[str, float] = field(default_factory=dict)  # version -> monotonic time of its last failure


def load_version(name: str, version: str) -> Any:
    """The registered version as a pyfunc model, its files read into memory and then removed: a long-running
    server follows many versions and must not keep a copy of each on disk."""
    # lazy: MLflow imported only where needed (seconds), not by every command
    import mlflow

    folder = tempfile.mkdtemp(prefix=f"legonet-serve-{name}-{version}-")
    try:
        path_before = list(sys.path)
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}", dst_path=folder)
        # MLflow prepends the package's code/ folder; this process runs its own, already imported, legonet code
        sys.path[:] = path_before
        return model
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Follower:
    """The serving state of one server process, kept in step with ``models:/<name>@<alias>``."""

    def __init__(self, tracking_uri: str, name: str, alias: str, poll: float = 0.5, retry: float = 30.0,
                 loader: Callable[[str, str], Any] = load_version) -> None:
        # lazy: MLflow imported only where needed (seconds), not by every command
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # load_model resolves models:/ URIs against it
        self.client = mlflow.MlflowClient(tracking_uri)
        self.name, self.alias, self.poll, self.retry, self.loader = name, alias, poll, retry, loader
        self.current: Served | None = None
        self.status = Status()
        self._stop = threading.Event()
        self._swap = threading.Lock()  # the poller and the loader both replace ``current``
        self._loader: threading.Thread | None = None
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        """One poll and, if the alias names a version, its load, before returning (the server answers /ping
        only once it has a model); then the poller thread."""
        self.poll_once()
        if self._loader is not None:
            self._loader.join()
        self._poller = threading.Thread(target=self._run, name="legonet-follower", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._poller, self._loader):
            if thread is not None:
                thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.poll_once()

    def poll_once(self) -> None:
        """Read the alias's version and tags; apply a quarantine or checkpoint change, or start loading a new
        version. Any registry error leaves the serving state as it is."""
        try:
            wanted = self.client.get_model_version_by_alias(self.name, self.alias)
            current = self.current
            if current is not None and str(wanted.version) != current.version:
                self._refresh(current, self.client.get_model_version(self.name, current.version).tags)
        except Exception as exc:  # MLflow raises its own kinds and SQLAlchemy's (a busy SQLite store): retried
            self.status.registry_error = f"{type(exc).__name__}: {exc}"
            return
        self.status.registry_error, self.status.polled_at = None, _now()
        version = str(wanted.version)
        if current is not None and current.version == version:
            self._refresh(current, wanted.tags)
        elif self.status.loading is None and self._may_load(version):
            self.status.loading = version
            self._loader = threading.Thread(target=self._load, args=(version,), name=f"legonet-load-{version}",
                                            daemon=True)
            self._loader.start()

    def _may_load(self, version: str) -> bool:
        failed = self.status.failed_at.get(version)
        return failed is None or time.monotonic() - failed >= self.retry

    def _refresh(self, served: Served, tags: dict[str, str]) -> None:
        """Swap in ``served`` with the quarantine and checkpoint ``tags`` give, if either changed."""
        updated = _with_tags(served, tags)
        if updated == served:
            return
        with self._swap:
            if self.current is not served:  # the loader swapped a new version in meanwhile: its tags are newer
                return
            self.current = updated
            log.info("model version %s: quarantine %s, audit checkpoint %s%s", served.version,
                     sorted(updated.quarantine), "present" if updated.checkpoint else "none",
                     f" (refusing to predict: {updated.refusal})" if updated.refusal else "")

    def _load(self, version: str) -> None:
        try:
            model = self.loader(self.name, version)
            found = self.client.get_model_version(self.name, version)  # tags as they are now, after the load
        except Exception as exc:  # whatever the package or the store raises: the old version keeps serving
            self.status.failed_at[version] = time.monotonic()
            self.status.load_failure = {"version": version, "error": f"{type(exc).__name__}: {exc}",
                                        "at": _now()}
            log.error("model version %s failed to load; still serving %s: %s", version,
                      self.current.version if self.current else "nothing", exc)
            return
        finally:
            self.status.loading = None
        with self._swap:
            previous = self.current
            self.current = _with_tags(Served(version, model, found.run_id, frozenset(), None, None, _now()),
                                      found.tags)
        self.status.failed_at.pop(version, None)
        if self.status.load_failure and self.status.load_failure["version"] == version:
            self.status.load_failure = None
        log.info("serving model version %s of %s (was %s)", version, self.name,
                 previous.version if previous else "none")


def _with_tags(served: Served, tags: dict[str, str]) -> Served:
    """``served`` with the quarantine and audit checkpoint its version's ``tags`` hold now."""
    try:
        adapters, tag = quarantine.read(tags, served.version)
    except QuarantineUnreadable as exc:
        return replace(served, refusal=str(exc), checkpoint=tags.get(CHECKPOINT_TAG))
    return replace(served, quarantine=adapters, quarantine_tag=tag, checkpoint=tags.get(CHECKPOINT_TAG),
                   refusal=None)
