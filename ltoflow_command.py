"""The `ltoflow` command's entry point, outside the package: importing `ltoflow` loads the
engine (a third of a second), and a Ctrl-C or a SIGTERM meanwhile should end the command as
quietly as one a moment later does, with no traceback."""

from __future__ import annotations

import gc
import signal
import sys


def main() -> None:
    # SIGTERM as SIGINT: until a job takes both signals over (to stop cleanly), either ends the
    # command with one line and exit 130, not SIGTERM's silent death (exit 143).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Loading makes only objects that live as long as the program: a collection meanwhile
    # finds nothing to free (a twentieth of the start-up), and once frozen no later one walks
    # them again.
    gc.disable()
    try:
        from ltoflow.cli import EXIT_INTERRUPTED, entry
    except KeyboardInterrupt:
        print("ltoflow: interrupted while starting", file=sys.stderr)
        sys.exit(130)  # EXIT_INTERRUPTED, which this import did not get to
    finally:
        gc.freeze()
        gc.enable()
    try:
        entry()
    except KeyboardInterrupt:  # before or after the job's own handling
        print("ltoflow: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
