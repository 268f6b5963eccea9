"""Every error legonet raises on purpose, and the exit code the `legonet` command gives it.

Each type says which boundary refused what; its message is one line that names the file, the sample ID or the
setting, and the fix. The CLI maps a type to its exit code here and nowhere else.
"""

from __future__ import annotations


class AuditError(Exception):
    """The audit log or its keys cannot be used as asked; the message names the file and the fix."""
