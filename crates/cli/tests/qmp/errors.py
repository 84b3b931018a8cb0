"""The error replies of a sequence of bad commands, for the differential
test: prints [[command, class, desc], ...] as JSON. Node names and the
files are the same on both servers, so the messages must match exactly.

usage: errors.py SOCKET BASE OVERLAY
"""
import asyncio
import json
import sys

from qemu.qmp import ExecuteError

from common import connect, fail, job

out = []


async def bad(qmp, cmd, args):
    try:
        r = await qmp.execute(cmd, args)
    except ExecuteError as e:
        out.append([cmd, e.error_class, e.error.error.desc])
        return
    fail(f"{cmd} {args} succeeded: {r}")


async def main():
    sock, base, overlay = sys.argv[1:4]
    qmp = await connect(sock)
    await bad(qmp, "no-such-command", {})
    await bad(qmp, "block-stream", {})
    await bad(qmp, "block-stream", {"device": "top", "speed": "fast"})
    await bad(qmp, "block-stream", {"device": "top", "bogus": 1})
    await bad(qmp, "block-stream", {"device": "top"})
    await bad(qmp, "block-job-pause", {"device": "nope"})
    await bad(qmp, "job-pause", {"id": "nope"})
    await bad(qmp, "blockdev-del", {"node-name": "nope"})
    await bad(qmp, "blockdev-add", {"driver": "qcow2",
                                    "file": {"driver": "file", "filename": base}})
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "base", "read-only": True,
                                       "file": {"driver": "file", "filename": base}})
    await bad(qmp, "blockdev-add", {"driver": "qcow2", "node-name": "base",
                                    "file": {"driver": "file", "filename": base}})
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "top", "backing": "base",
                                       "file": {"driver": "file", "filename": overlay}})
    await bad(qmp, "block-stream", {"device": "top", "job-id": "j0", "speed": -1})
    await bad(qmp, "block-stream", {"device": "top", "job-id": "1j"})
    await bad(qmp, "block-stream", {"device": "top", "base-node": "top"})
    await bad(qmp, "block-stream", {"device": "top", "base": "/nonexistent"})
    await bad(qmp, "block-stream", {"device": "top", "base": base, "base-node": "base"})
    await qmp.execute("block-stream", {"device": "top", "job-id": "j", "speed": 1 << 20})
    await bad(qmp, "block-stream", {"device": "top", "job-id": "j"})
    await bad(qmp, "block-stream", {"device": "top", "job-id": "j2"})
    await bad(qmp, "blockdev-del", {"node-name": "top"})
    await bad(qmp, "block-job-resume", {"device": "j"})
    await bad(qmp, "block-job-set-speed", {"device": "j", "speed": -1})
    await bad(qmp, "block-job-finalize", {"id": "j"})
    await bad(qmp, "block-job-dismiss", {"id": "j"})
    await bad(qmp, "block-job-complete", {"device": "j"})
    await qmp.execute("block-job-pause", {"device": "j"})
    await bad(qmp, "block-job-pause", {"device": "j"})
    await bad(qmp, "block-job-cancel", {"device": "j"})
    await qmp.execute("job-cancel", {"id": "j"})
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    while await job(qmp, "j") is not None:
        if loop.time() > end:
            fail("job j still listed 60 s after job-cancel")
        await asyncio.sleep(0.05)
    await bad(qmp, "qmp_capabilities", {})
    await qmp.execute("blockdev-del", {"node-name": "top"})
    await qmp.execute("blockdev-del", {"node-name": "base"})
    await qmp.disconnect()
    print(json.dumps(out))


asyncio.run(main())
