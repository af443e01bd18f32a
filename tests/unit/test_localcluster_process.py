"""A stopped component counts as gone only once it has finished exiting (a zombie or no process),
not when its command line empties early in its exit while it still holds its listening socket."""

from __future__ import annotations

import signal
import subprocess
import time

from fleetkeeper.localcluster.cluster import _gone


def test_a_process_is_gone_only_once_it_has_exited():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        assert not _gone(proc.pid)
        proc.send_signal(signal.SIGSTOP)  # stopped is not exited
        assert not _gone(proc.pid)
        proc.kill()
        # not yet reaped: a zombie has closed its files, so it counts as gone
        while True:
            with open(f"/proc/{proc.pid}/stat") as f:
                raw = f.read()
            if raw[raw.rindex(")") + 2] == "Z":
                break
            time.sleep(0.01)
        assert _gone(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert _gone(proc.pid)  # reaped: no such process
