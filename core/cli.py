"""The one wrapper every command line goes through: a user mistake is one message and exit 2, no traceback.

    sys.exit(cli.run(lambda: do_the_work(args)))
"""
from __future__ import annotations

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
