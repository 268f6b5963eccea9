"""S3 stores a purge reaches (a DVC remote's root, an MLflow server's artifact destination), and the one error
every store failure becomes: boto3's errors mapped to a line that names the store, what failed and the fix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.errors import StoreError

_UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError")
_PERMISSION = {"ListObjectVersions": "s3:ListBucketVersions", "ListObjectsV2": "s3:ListBucket",
               "HeadBucket": "s3:ListBucket", "GetBucketVersioning": "s3:GetBucketVersioning",
               "DeleteObjects": "s3:DeleteObject and s3:DeleteObjectVersion"}  # by the API call refused


@dataclass(frozen=True)
class Bucket:
    """One S3 prefix (a DVC remote's root, an MLflow artifact destination) and a client with its credentials."""

    client: Any
    name: str
    prefix: str  # without leading or trailing slash
    label: str  # how messages and the audit record name the store

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}".rstrip("/")

    @contextmanager
    def _calls(self, action: str) -> Iterator[None]:
        """Map boto3's errors to one StoreError line that says which store, what failed and what to do."""
        # lazy: botocore imported only where needed (seconds), not by every command and stage
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("AccessDenied", "403", "AllAccessDisabled"):
                raise StoreError(f"{self.label} ({self.url}): the credentials may not {action} ({code}); grant "
                                 f"{_PERMISSION.get(exc.operation_name, exc.operation_name)} "
                                 "(docs/remote-stores.md lists what purge needs)") from None
            raise StoreError(f"{self.label} ({self.url}): {action} failed: {code} {exc}") from None
        except BotoCoreError as exc:
            kind = "unreachable" if type(exc).__name__ in _UNREACHABLE else "failed"
            raise StoreError(f"{self.label} ({self.url}) {kind} while trying to {action}: {exc}") from None

    def probe(self) -> None:
        with self._calls("reach the bucket"):
            self.client.head_bucket(Bucket=self.name)

    def versioned(self) -> bool:
        """Whether the bucket keeps (or once kept) old versions: then every version of an object must go."""
        with self._calls("read the bucket's versioning"):
            status = self.client.get_bucket_versioning(Bucket=self.name).get("Status")
        return status in ("Enabled", "Suspended")

    def entries(self, versions: bool) -> Iterator[dict[str, Any]]:
        """Every object (every version and delete marker, with ``versions``) under the prefix: Key, VersionId, Size,
        and ``rel``, the key relative to the prefix."""
        start = f"{self.prefix}/" if self.prefix else ""
        operation = "list_object_versions" if versions else "list_objects_v2"
        with self._calls("list the objects' versions" if versions else "list the objects"):
            for page in self.client.get_paginator(operation).paginate(Bucket=self.name, Prefix=start):
                for item in [*page.get("Versions", []), *page.get("Contents", []), *page.get("DeleteMarkers", [])]:
                    yield {"Key": item["Key"], "VersionId": item.get("VersionId") if versions else None,
                           "Size": item.get("Size", 0), "rel": item["Key"][len(start):]}

    def read(self, rel: str) -> bytes:
        """The content of the object at ``rel`` (relative to the prefix)."""
        with self._calls("read an object"):
            return self.client.get_object(Bucket=self.name, Key="/".join(p for p in (self.prefix, rel) if p)
                                          )["Body"].read()

    def purge(self, doomed: Callable[[str], bool]) -> dict[str, Any]:
        """Delete every object (every version, where the bucket keeps them) whose relative key ``doomed`` selects."""
        versioned = self.versioned()
        chosen = [e for e in self.entries(versioned) if doomed(e["rel"])]
        for at in range(0, len(chosen), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": e["Key"], **({"VersionId": e["VersionId"]} if e["VersionId"] else {})}
                     for e in chosen[at:at + 1000]]
            action = "delete object versions" if versioned else "delete objects"
            with self._calls(action):
                errors = self.client.delete_objects(Bucket=self.name, Delete={"Objects": batch, "Quiet": True}
                                                    ).get("Errors", [])
            if errors:
                first = errors[0]
                grant = "s3:DeleteObjectVersion" if versioned else "s3:DeleteObject"
                raise StoreError(f"{self.label} ({self.url}): {len(errors)} object(s) not deleted ({first.get('Code')} "
                                 f"on {first.get('Key')}: {first.get('Message')}); the credentials must be allowed "
                                 f"{grant}: refusing to record a purge that did not happen")
        return {"store": self.url, "versioned": versioned, "deleted_objects": len({e["Key"] for e in chosen}),
                "deleted_versions": len(chosen), "bytes": sum(e["Size"] for e in chosen)}


def _bucket(url: str, session: Any, label: str, **client: Any) -> Bucket:
    # lazy: botocore imported only where needed (seconds), not by every command and stage
    from urllib.parse import urlsplit

    from botocore.config import Config

    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise StoreError(f"{label} ({url}): purge reaches local directories and s3:// stores only; delete the "
                         "superseded objects there by hand, or remove the remote (docs/remote-stores.md)")
    timeouts = Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                      signature_version=client.pop("signature_version", None))
    return Bucket(session.client("s3", config=timeouts, **client), parts.netloc, parts.path.strip("/"), label)


def remote_bucket(name: str, conf: dict[str, Any]) -> Bucket:
    """A DVC S3 remote with the credentials DVC itself would use (``endpointurl``, keys, ``profile``,
    ``credentialpath``, ``region``, ``ssl_verify``, ``allow_anonymous_login`` from the merged DVC config)."""
    # lazy: boto3, botocore imported only where needed (seconds), not by every command and stage
    import boto3
    import botocore
    import botocore.session

    core = botocore.session.Session(profile=conf.get("profile"))
    for option, variable in (("credentialpath", "credentials_file"), ("configpath", "config_file")):
        if conf.get(option):
            core.set_config_variable(variable, conf[option])
    session = boto3.Session(botocore_session=core, aws_access_key_id=conf.get("access_key_id"),
                            aws_secret_access_key=conf.get("secret_access_key"),
                            aws_session_token=conf.get("session_token"), region_name=conf.get("region"))
    client = {"endpoint_url": conf.get("endpointurl"), "use_ssl": conf.get("use_ssl", True),
              "verify": conf.get("ssl_verify"),
              "signature_version": botocore.UNSIGNED if conf.get("allow_anonymous_login") else None}
    return _bucket(conf["url"], session, f"DVC remote '{name}'", **client)


def artifact_bucket(destination: str) -> Bucket:
    """The MLflow server's ``--artifacts-destination``, reached the way MLflow's own S3 store reaches it:
    ``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_IGNORE_TLS`` and the standard AWS credential chain."""
    # lazy: boto3 imported only where needed (seconds), not by every command and stage
    import os

    import boto3

    verify = False if os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() == "true" else None
    return _bucket(destination, boto3.Session(), "MLflow artifact store",
                   endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, verify=verify)

