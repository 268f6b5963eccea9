"""Every error legonet raises on purpose, and the exit code the `legonet` command gives it.

Each type says which boundary refused what; its message is one line that names the file, the sample ID or the
setting, and the fix. The command prints that line and exits with the type's ``exit_code``
(docs/design.md section 7); anything else is a bug and ends with a traceback.
"""

from __future__ import annotations


class LegonetError(Exception):
    """Base of every error the `legonet` command reports as one line with a distinct exit code."""

    exit_code = 1


# --- 2: usage ---


class InitError(LegonetError, RuntimeError):
    """The target folder cannot become a project as asked; the message says why and what to pass."""

    exit_code = 2


# --- 3: bad data or manifest ---


class DataError(LegonetError, ValueError):
    """Bad input data: the message names the file, the rule and the first offending sample IDs."""

    exit_code = 3


class ContractError(DataError):
    """A table broke its contract: the message names the file, the rule and the first failing sample IDs."""


class ManifestError(LegonetError, ValueError):
    """A manifest that cannot be accepted; the message is one line: file, problem, fix."""

    exit_code = 3


class ForgetError(LegonetError, RuntimeError):
    """The request cannot be applied as given; nothing has been changed."""

    exit_code = 3


# --- 4: bad params ---


class ParamsError(LegonetError, ValueError):
    """params.yaml is missing, malformed or inconsistent; the message says which key and how to fix it."""

    exit_code = 4


class IdentityError(ParamsError):
    """The project has no valid ID, or a name it would use belongs to another project; the message says the fix."""


class ExecutorError(LegonetError, RuntimeError):
    """The executor cannot run: unknown name, or Ray asked for but not installed / not reachable."""

    exit_code = 4


class EncoderError(LegonetError, ValueError):
    """An encoder request that cannot be served: unknown name, model file of another encoder or image size."""

    exit_code = 4


class KeysError(LegonetError, ValueError):
    """The reference split cannot support the requested projection or number of keys."""

    exit_code = 4


# --- 5: a stage failed ---


class BuildError(LegonetError, RuntimeError):
    """`dvc repro` failed; the message carries the failing stage and DVC's own output."""

    exit_code = 5


class StageFailed(LegonetError, RuntimeError):
    """A stage in the worker process stopped on bad data or params (the message is the stage's own)."""

    exit_code = 5


class WorkerFailed(LegonetError, RuntimeError):
    """The stage worker process crashed or ended; the message carries its traceback or exit code."""

    exit_code = 5


# --- 6: no model ---


class ModelError(LegonetError, RuntimeError):
    """No registered model to predict with, or it cannot be loaded."""

    exit_code = 6


class QuarantineUnreadable(ModelError, ValueError):
    """A model version's quarantine tag is not the JSON legonet writes: never read as "no quarantine" (serving the
    adapters it names would answer from a forgotten sample)."""


class RegistryError(LegonetError, LookupError):
    """The registry has no such model version; the message names it and where to look."""

    exit_code = 6


# --- 7: the project lock is busy ---


class LockBusy(ForgetError):
    """Another forget holds the project lock."""

    exit_code = 7


# --- 8: an exactness check failed ---


class ExactnessError(LegonetError, RuntimeError):
    """A post-rebuild check failed: the flow stops before registering or purging anything."""

    exit_code = 8


# --- 9: the audit log does not verify ---


class AuditError(LegonetError):
    """The audit log or its keys cannot be used as asked; the message names the file and the fix."""

    exit_code = 9


class AuditFailed(LegonetError, RuntimeError):
    """`legonet audit verify` found problems; the message lists each one."""

    exit_code = 9


class TransparencyError(LegonetError, ValueError):
    """A checkpoint, note or proof that does not parse or does not verify; the message says which and why."""

    exit_code = 9


# --- 10: a store is unreachable or refuses the purge ---


class StoreError(LegonetError, RuntimeError):
    """A configured store (DVC remote, MLflow server or its artifact bucket) cannot be reached or refuses a purge.

    The forget does not stop: what is left to purge is recorded as pending (pipeline.purge.pending), the audit
    record says so, and the command ends with this exit code; the next `legonet forget` retries the purge.
    """

    exit_code = 10
