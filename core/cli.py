"""The one wrapper every command line goes through: a user mistake is one message and exit 2, no traceback.

    sys.exit(cli.run(lambda: do_the_work(args)))
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from core.errors import PackError

INTERRUPTED = "interrupted: finished stages are intact; rerun the same command to resume"


def run(work: Callable[[], int | None], interrupted: str = INTERRUPTED) -> int:
    """Call `work`; PackError -> its problems on stderr and 2, Ctrl-C -> `interrupted` and 130."""
    try:
        return work() or 0
    except PackError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130


def domain_parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """The arguments every per-domain command takes: --domain and pack overrides (key.path=value)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    parser.add_argument("--domain", required=True, help="a folder under domains/, e.g. finance")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="pack overrides")
    return parser
