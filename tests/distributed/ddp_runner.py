"""Runs several ``rlhf fit`` commands one after the other in one process: ``python ddp_runner.py SPEC.json``.

SPEC holds ``[{"cwd": folder, "args": [arg, ...]}, ...]``, each command run in its folder (the configs' relative
paths land in it). Under a distributed strategy the first Trainer's launcher starts the other ranks by re-running
this script with the same SPEC, and every later Trainer reuses the process group: the phases pay for one launch (the
interpreter and imports dominate a tiny run's time), not one each.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rlhf_lightning.cli import main as rlhf_main

if __name__ == "__main__":
    for command in json.loads(Path(sys.argv[1]).read_text()):
        os.chdir(command["cwd"])
        rlhf_main(command["args"])
