"""Where the `legonet` commands write: one rich console on stderr for messages and progress; stdout stays for
results a script reads (JSON summaries, predictions, receipts)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def emit(text: str, output: Path | None, what: str) -> None:
    """``text`` to stdout, or to ``output`` with a message saying so."""
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote the {what} to {output}")
