"""QMP protocol and job-state checks against `diskstream daemon`.

usage: protocol.py SOCKET RAW_IMAGE
"""
import asyncio
import json
import sys

from common import Recorder, connect, expect_error, fail, job, TIMEOUT


async def raw_socket(sock):
    r, w = await asyncio.open_unix_connection(sock)

    async def line():
        return json.loads(await asyncio.wait_for(r.readline(), TIMEOUT))

    async def send(data):
        w.write(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")
        await w.drain()
        return await line()

    g = await line()
    ver = g["QMP"]["version"]
    if ver["qemu"]["major"] != 10 or not isinstance(ver["package"], str):
        fail(f"greeting {g}")
    if g["QMP"]["capabilities"] != []:
        fail(f"greeting capabilities {g}")
    rep = await send({"execute": "query-version", "id": 1})
    if rep.get("error", {}).get("class") != "CommandNotFound" or rep.get("id") != 1:
        fail(f"command before negotiation: {rep}")
    rep = await send({"execute": "qmp_capabilities"})
    if rep != {"return": {}}:
        fail(f"qmp_capabilities: {rep}")
    rep = await send({"execute": "qmp_capabilities", "id": "again"})
    if rep.get("error", {}).get("class") != "CommandNotFound" or rep.get("id") != "again":
        fail(f"second qmp_capabilities: {rep}")
    rep = await send(b'{"execute": nope}\n')
    err = rep.get("error", {})
    if err.get("class") != "GenericError" or not err.get("desc", "").startswith("JSON parse error"):
        fail(f"broken JSON: {rep}")
    # Still usable, and the id comes back whatever JSON it is.
    rep = await send({"execute": "query-version", "id": {"n": [1, 2]}})
    if "return" not in rep or rep.get("id") != {"n": [1, 2]}:
        fail(f"after broken JSON: {rep}")
    rep = await send({"execute": "query-version", "arguments": [], "id": 3})
    if rep.get("error", {}).get("class") != "GenericError" or rep.get("id") != 3:
        fail(f"arguments not an object: {rep}")
    # Two requests in one write, answered in order.
    w.write(b'{"execute": "query-jobs", "id": "a"}{"execute": "query-jobs", "id": "b"}\n')
    await w.drain()
    a, b = await line(), await line()
    if a.get("id") != "a" or b.get("id") != "b":
        fail(f"pipelined requests: {a} {b}")
    w.close()


async def main():
    sock, raw = sys.argv[1], sys.argv[2]
    await raw_socket(sock)

    qmp = await connect(sock)
    v = await qmp.execute("query-version")
    if v["qemu"]["major"] != 10:
        fail(f"query-version {v}")
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for n in ("block-stream", "query-block-jobs", "block-job-set-speed", "job-dismiss",
              "__com.diskstream_block-stream-step"):
        if n not in names:
            fail(f"query-commands lacks {n}")

    await expect_error(qmp, "no-such-command", {}, "CommandNotFound",
                       "The command no-such-command has not been found")
    await expect_error(qmp, "block-stream", {"speed": 1}, "GenericError",
                       "Parameter 'device' is missing")
    await expect_error(qmp, "block-stream", {"device": "r0", "speed": "fast"}, "GenericError",
                       "Invalid parameter type for 'speed', expected: integer")
    await expect_error(qmp, "query-block-jobs", {"bogus": 1}, "GenericError",
                       "Parameter 'bogus' is unexpected")
    await expect_error(qmp, "block-stream", {"device": "r0"}, "GenericError",
                       "Cannot find device='r0' nor node-name='r0'")
    await expect_error(qmp, "blockdev-add", {"driver": "vmdk", "node-name": "x",
                                             "file": {"driver": "file", "filename": raw}},
                       "GenericError", "Parameter 'driver' does not accept value 'vmdk'")

    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "r0",
                                       "file": {"driver": "file", "filename": raw}})
    await expect_error(qmp, "blockdev-add", {"driver": "raw", "node-name": "r0",
                                             "file": {"driver": "file", "filename": raw}},
                       "GenericError", "Duplicate nodes with node-name='r0'")
    nodes = await qmp.execute("query-named-block-nodes")
    r0 = [n for n in nodes if n["node-name"] == "r0"]
    if len(r0) != 1 or r0[0]["drv"] != "raw" or r0[0]["image"]["filename"] != raw:
        fail(f"query-named-block-nodes {nodes}")
    if r0[0]["__com.diskstream_remote-bytes"] != 0:
        fail(f"a lone raw image has nothing remote: {r0}")

    # A job held in pending, then concluded: the verb table decides.
    rec = Recorder(qmp)
    await qmp.execute("block-stream", {"device": "r0", "job-id": "j1",
                                       "auto-finalize": False, "auto-dismiss": False})
    await expect_error(qmp, "block-stream", {"device": "r0", "job-id": "j2"},
                       "GenericError",
                       "Node 'r0' is busy: block device is in use by block job: stream")
    await rec.until("BLOCK_JOB_PENDING")
    want = [["JOB_STATUS_CHANGE", "created"], ["JOB_STATUS_CHANGE", "running"],
            ["JOB_STATUS_CHANGE", "waiting"], ["JOB_STATUS_CHANGE", "pending"],
            ["BLOCK_JOB_PENDING", None]]
    if rec.seen != want:
        fail(f"events up to pending: {rec.seen}, expected {want}")
    j = await job(qmp, "j1")
    if j is None or j["status"] != "pending" or j["type"] != "stream" or j["ready"]:
        fail(f"query-block-jobs in pending: {j}")
    await expect_error(qmp, "block-job-pause", {"device": "j1"}, "GenericError",
                       "Job 'j1' in state 'pending' cannot accept command verb 'pause'")
    await expect_error(qmp, "block-job-set-speed", {"device": "j1", "speed": 1}, "GenericError",
                       "Job 'j1' in state 'pending' cannot accept command verb 'set-speed'")
    await expect_error(qmp, "job-dismiss", {"id": "j1"}, "GenericError",
                       "Job 'j1' in state 'pending' cannot accept command verb 'dismiss'")
    await expect_error(qmp, "blockdev-del", {"node-name": "r0"}, "GenericError",
                       contains="is busy")
    await qmp.execute("block-job-finalize", {"id": "j1"})
    await rec.until("JOB_STATUS_CHANGE", "concluded")
    if rec.seen[-2:] != [["BLOCK_JOB_COMPLETED", None], ["JOB_STATUS_CHANGE", "concluded"]]:
        fail(f"events after finalize: {rec.seen}")
    j = await job(qmp, "j1")
    if j is None or j["status"] != "concluded" or j["offset"] != j["len"]:
        fail(f"query-block-jobs after finalize: {j}")
    await expect_error(qmp, "block-job-resume", {"device": "j1"}, "GenericError",
                       "Can't resume a job that was not paused")
    await expect_error(qmp, "block-job-cancel", {"device": "j1"}, "GenericError",
                       "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'")
    await expect_error(qmp, "job-finalize", {"id": "j1"}, "GenericError",
                       "Job 'j1' in state 'concluded' cannot accept command verb 'finalize'")
    await qmp.execute("block-job-dismiss", {"id": "j1"})
    await rec.until("JOB_STATUS_CHANGE", "null")
    if await qmp.execute("query-block-jobs") != [] or await qmp.execute("query-jobs") != []:
        fail("jobs left after dismiss")

    await expect_error(qmp, "block-job-pause", {"device": "nope"}, "DeviceNotActive",
                       "Block job 'nope' not found")
    await expect_error(qmp, "job-pause", {"id": "nope"}, "GenericError", "Job not found")

    # One-unit mode on a node with nothing below: nothing to copy, completed.
    r = await qmp.execute("__com.diskstream_block-stream-step", {"device": "r0", "offset": 0})
    if r["next-offset"] != r["len"] or not r["completed"] or r["copied"] != 0:
        fail(f"step: {r}")

    await qmp.execute("blockdev-del", {"node-name": "r0"})
    await expect_error(qmp, "blockdev-del", {"node-name": "r0"}, "GenericError",
                       "Failed to find node with node-name='r0'")
    await qmp.execute("query-version")
    await qmp.disconnect()
    print("ok")


asyncio.run(main())
