"""A stand-in for torchrun + the training loop: counts steps, saves its step on SIGTERM (exit 75),
resumes from the saved step, and records every start. Used by the preemption tests."""

import json
import signal
import sys
import time
from pathlib import Path

state_file, total_steps = Path(sys.argv[1]), int(sys.argv[2])
state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "starts": 0, "saves": 0}
state["starts"] += 1
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
state_file.write_text(json.dumps(state))
while state["step"] < total_steps:
    if stop:
        time.sleep(0.3)  # a checkpoint takes a while: the parent must wait for it
        state["saves"] += 1
        state_file.write_text(json.dumps(state))
        sys.exit(75)
    time.sleep(0.05)
    state["step"] += 1
state_file.write_text(json.dumps(state))
