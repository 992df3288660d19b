"""Command-line scripts behind ``trl-aem train`` and ``trl-aem eval`` (each also runs as ``python -m``)."""

from __future__ import annotations

import sys
from typing import NoReturn


def usage_error(prog: str | None, message) -> NoReturn:
    """Print ``<prog>: error: <message>`` to stderr and exit with code 2 (a usage error), without argparse's usage
    block (the training parser's lists hundreds of options)."""
    print(f"{prog or 'trl-aem'}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
