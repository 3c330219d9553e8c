"""The grader's end of a judge kept for one lesson (``python -m grader.judge serve``)."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from .judge import receive, send


class JudgeProcess:
    """A trusted judge process: the lesson's setup run once, then one job per submission."""

    def __init__(self, home: Path, env: dict, params: str, setup: str, ready_timeout: float):
        self.log = open(home / "judge.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "grader.judge", "serve"], cwd=home,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, bufsize=0, start_new_session=True)
        send(self.proc.stdin, {"params": params, "setup": setup})
        header = self._receive(ready_timeout)
        if header.get("op") != "ready":
            self.close()
            raise RuntimeError("the judge did not start")
        self.error = header.get("error") or ""

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the judge did not answer in time")
            if select.select([self.proc.stdout], [], [], left)[0]:
                return receive(self.proc.stdout)[0]

    def run(self, job: dict, timeout: float) -> dict:
        send(self.proc.stdin, job)
        header = self._receive(timeout)
        if header.get("op") != "verdicts":
            raise RuntimeError("the judge broke the protocol")
        return header

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            try:
                f.close()
            except OSError:
                pass
