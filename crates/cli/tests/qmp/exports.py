"""NBD exports of daemon nodes over QMP.

usage: exports.py SOCKET RAW_IMAGE add|del
  add: blockdev-add a raw node 'd0' and export it writable as 'd0'
  del: delete the export and stop the server (BLOCK_EXPORT_DELETED each)
"""
import asyncio
import sys

from qemu.qmp import EventListener

from common import connect, expect_error, fail, TIMEOUT


async def main():
    sock, raw, phase = sys.argv[1:4]
    qmp = await connect(sock)
    if phase == "add":
        await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "d0",
                                           "file": {"driver": "file", "filename": raw}})
        await expect_error(qmp, "block-export-add",
                           {"type": "nbd", "id": "e0", "node-name": "d0"},
                           "GenericError", "NBD server not running")
        addr = {"type": "unix", "data": {"path": sys.argv[4]}}
        await qmp.execute("nbd-server-start", {"addr": addr})
        await expect_error(qmp, "nbd-server-start", {"addr": addr}, "GenericError",
                           "NBD server already running")
        await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0",
                                               "writable": True})
        await expect_error(qmp, "block-export-add",
                           {"type": "nbd", "id": "e0", "node-name": "d0", "name": "other"},
                           "GenericError", "Block export id 'e0' is already in use")
        await expect_error(qmp, "block-export-add",
                           {"type": "nbd", "id": "e1", "node-name": "d0"},
                           "GenericError", "NBD server already has export named 'd0'")
        await expect_error(qmp, "block-export-add",
                           {"type": "nbd", "id": "e2", "node-name": "nope"},
                           "GenericError", "Cannot find device='nope' nor node-name='nope'")
        await expect_error(qmp, "blockdev-del", {"node-name": "d0"}, "GenericError",
                           contains="is busy")
        ex = await qmp.execute("query-block-exports")
        if ex != [{"type": "nbd", "id": "e0", "node-name": "d0", "shutting-down": False}]:
            fail(f"query-block-exports {ex}")
    else:
        listener = EventListener(("BLOCK_EXPORT_DELETED",))
        qmp.register_listener(listener)
        await qmp.execute("block-export-del", {"id": "e0"})
        ev = await asyncio.wait_for(listener.get(), TIMEOUT)
        if ev["data"] != {"id": "e0"}:
            fail(f"BLOCK_EXPORT_DELETED {ev}")
        await expect_error(qmp, "block-export-del", {"id": "e0"}, "GenericError",
                           "Export 'e0' is not found")
        if await qmp.execute("query-block-exports") != []:
            fail("export left after block-export-del")
        await qmp.execute("nbd-server-stop")
        await expect_error(qmp, "nbd-server-stop", {}, "GenericError", "NBD server not running")
        await qmp.execute("blockdev-del", {"node-name": "d0"})
    await qmp.disconnect()
    print("ok")


asyncio.run(main())
