"""The autodiff CLI with a pause aimed at one atomic write, for crash trials (benchmarks/crash_trials.py).

    AUTODIFF_TEST_PAUSE_BEFORE_REPLACE=<file name>:<seconds> python tests/tools/pausing_cli.py train ...

Every atomic write of a file with that name says `pause before replace <name>` on stderr and
sleeps between writing its temporary copy and `os.replace`, so a SIGKILL can land in the middle
of it. Without the variable this is the plain CLI. It lives here, not in the package: the
product has no test-only code path.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PAUSE_ENV = "AUTODIFF_TEST_PAUSE_BEFORE_REPLACE"


def install() -> None:
    name, _, seconds = os.environ.get(PAUSE_ENV, "").rpartition(":")
    if not name:
        return
    real_replace = os.replace

    def pausing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            print(f"pause before replace {name}", file=sys.stderr, flush=True)
            time.sleep(float(seconds))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = pausing_replace  # this process only: files.atomic_write_bytes calls os.replace


if __name__ == "__main__":
    install()
    if len(sys.argv) > 1 and sys.argv[1] == "-c":  # run a snippet instead of the CLI (the primitive's own test)
        code = sys.argv[2]
        sys.argv = sys.argv[2:]
        exec(compile(code, "<pausing_cli -c>", "exec"), {"__name__": "__main__"})
    else:
        from autodiff_cli.app.cli import main

        sys.argv[0] = "autodiff"
        main()
