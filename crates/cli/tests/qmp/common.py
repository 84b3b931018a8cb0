"""Helpers shared by the QMP test scripts (driven with the PyPI qemu.qmp client).

Every wait is bounded: a script that does not see what it expects fails
with a message naming what it waited for.
"""
import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

TIMEOUT = 60.0


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


async def connect(sock, name="test"):
    qmp = QMPClient(name)
    await asyncio.wait_for(qmp.connect(sock), TIMEOUT)
    return qmp


async def expect_error(qmp, cmd, args, cls, desc=None, contains=None):
    try:
        r = await asyncio.wait_for(qmp.execute(cmd, args), TIMEOUT)
    except ExecuteError as e:
        got_cls, got_desc = e.error_class, e.error.error.desc
        if got_cls != cls:
            fail(f"{cmd} {args}: error class {got_cls} ({got_desc}), expected {cls}")
        if desc is not None and got_desc != desc:
            fail(f"{cmd} {args}: error {got_desc!r}, expected {desc!r}")
        if contains is not None and contains not in got_desc:
            fail(f"{cmd} {args}: error {got_desc!r} does not contain {contains!r}")
        return got_desc
    fail(f"{cmd} {args}: succeeded with {r}, expected {cls}")


class Recorder:
    """Collects job events in order: ('JOB_STATUS_CHANGE', status) or (name, None)."""

    NAMES = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
             "BLOCK_JOB_ERROR", "BLOCK_JOB_PENDING", "BLOCK_JOB_READY")

    def __init__(self, qmp):
        self.listener = EventListener(self.NAMES)
        qmp.register_listener(self.listener)
        self.seen = []

    async def until(self, name, status=None, timeout=TIMEOUT):
        """Reads events until `name` (with `status` for JOB_STATUS_CHANGE)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            left = end - loop.time()
            if left <= 0:
                fail(f"timed out waiting for {name} {status or ''}; saw {self.seen}")
            try:
                ev = await asyncio.wait_for(self.listener.get(), left)
            except asyncio.TimeoutError:
                fail(f"timed out waiting for {name} {status or ''}; saw {self.seen}")
            data = ev.get("data", {})
            ts = ev.get("timestamp", {})
            if not isinstance(ts.get("seconds"), int) or not isinstance(ts.get("microseconds"), int):
                fail(f"event without a proper timestamp: {ev}")
            st = data.get("status") if ev["event"] == "JOB_STATUS_CHANGE" else None
            self.seen.append([ev["event"], st])
            if ev["event"] == name and (status is None or st == status):
                return data


async def job(qmp, job_id):
    jobs = await qmp.execute("query-block-jobs")
    for j in jobs:
        if j["device"] == job_id:
            return j
    return None
