"""The block-stream sequence of the differential test, run against any QMP
server (qemu-storage-daemon or diskstream daemon): add a qcow2 overlay over a
qcow2 backing, stream throttled, set-speed, pause, resume, cancel, stream
again to completion, delete the nodes. Prints the job events seen, in order,
as JSON on stdout.

usage: stream_seq.py SOCKET BASE OVERLAY
"""
import asyncio
import json
import sys

from common import Recorder, connect, fail, job

SLOW = 1 << 20  # bytes/s: pause/resume/cancel cannot race completion


async def main():
    sock, base, overlay = sys.argv[1:4]
    qmp = await connect(sock)
    await qmp.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "base", "read-only": True,
        "file": {"driver": "file", "filename": base}})
    await qmp.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "top", "backing": "base",
        "file": {"driver": "file", "filename": overlay}})
    rec = Recorder(qmp)

    await qmp.execute("block-stream", {"device": "top", "job-id": "job0", "speed": SLOW})
    await rec.until("JOB_STATUS_CHANGE", "running")
    await qmp.execute("block-job-set-speed", {"device": "job0", "speed": SLOW // 2})
    j = await job(qmp, "job0")
    if j is None or j["speed"] != SLOW // 2 or j["type"] != "stream":
        fail(f"after set-speed: {j}")
    await qmp.execute("block-job-pause", {"device": "job0"})
    await rec.until("JOB_STATUS_CHANGE", "paused")
    j = await job(qmp, "job0")
    if not j["paused"] or j["status"] != "paused" or j["offset"] >= j["len"]:
        fail(f"while paused: {j}")
    await qmp.execute("block-job-resume", {"device": "job0"})
    await rec.until("JOB_STATUS_CHANGE", "running")
    j = await job(qmp, "job0")
    if j["paused"] or j["status"] != "running":
        fail(f"after resume: {j}")
    await qmp.execute("block-job-cancel", {"device": "job0"})
    cancelled = await rec.until("BLOCK_JOB_CANCELLED")
    if cancelled["device"] != "job0" or cancelled["offset"] >= cancelled["len"]:
        fail(f"BLOCK_JOB_CANCELLED {cancelled}")
    await rec.until("JOB_STATUS_CHANGE", "null")
    if await qmp.execute("query-block-jobs") != []:
        fail("job listed after auto-dismiss")

    await qmp.execute("block-stream", {"device": "top", "job-id": "job1"})
    done = await rec.until("BLOCK_JOB_COMPLETED")
    if "error" in done or done["offset"] != done["len"] or done["device"] != "job1":
        fail(f"BLOCK_JOB_COMPLETED {done}")
    await rec.until("JOB_STATUS_CHANGE", "null")

    await qmp.execute("blockdev-del", {"node-name": "top"})
    await qmp.execute("blockdev-del", {"node-name": "base"})
    await qmp.disconnect()
    print(json.dumps(rec.seen))


asyncio.run(main())
