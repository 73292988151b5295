"""``python -m spa.bench _worker SPEC OUT`` (a ``bench backbone`` measurement process) or ``python -m spa.bench
KIND ...`` (the same as ``spa bench KIND ...``)."""

from __future__ import annotations

import sys

from spa.bench.backbone import _worker_main

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    from spa.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
