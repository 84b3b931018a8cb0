"""Starts a throttled block-stream and leaves it running, for the SIGTERM
test: returns once the job has copied something.

usage: sigterm_start.py SOCKET OVERLAY
"""
import asyncio
import sys

from common import connect, fail, job


async def main():
    sock, overlay = sys.argv[1:3]
    qmp = await connect(sock)
    await qmp.execute("blockdev-add", {
        "driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": overlay}})
    await qmp.execute("block-stream", {"device": "top", "speed": 2 << 20})
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while True:
        j = await job(qmp, "top")
        if j is None or j["status"] != "running":
            fail(f"job not running: {j}")
        if j["__com.diskstream_copied"] > 0:
            break
        if loop.time() > end:
            fail(f"nothing copied after 60 s: {j}")
        await asyncio.sleep(0.1)
    await qmp.disconnect()
    print("started")


asyncio.run(main())
