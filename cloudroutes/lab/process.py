"""Stopping the processes the lab started."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen[bytes], *, kill: bool = False, grace: float = 10) -> int:
    """Terminate (or kill) ``proc`` and reap it; kill it if it outlives the grace period."""
    if proc.poll() is None:
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
