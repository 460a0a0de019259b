"""``python -m cfsp`` for the torchrun tests, with one addition: when ``KILL_RANK1_WHEN`` names a
path, the process of rank 1 dies (as an out-of-memory kill would) once that path exists."""

import os
import sys
import threading
import time
from pathlib import Path

trigger = os.environ.get("KILL_RANK1_WHEN")
if trigger and os.environ.get("RANK") == "1":

    def die() -> None:
        while not Path(trigger).exists():
            time.sleep(0.02)
        os._exit(9)

    threading.Thread(target=die, daemon=True).start()

from cfsp.cli import app  # noqa: E402

sys.argv[0] = "cfsp"
app(prog_name="cfsp")
