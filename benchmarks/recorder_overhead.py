"""W3 on sqlite in one process, with and without the flow recorder, interleaved (median of 3).

Run: .venv/bin/python -m benchmarks.recorder_overhead [deliveries]. The recorder consumes in the
same process, so its whole cost lands on the measured figure.
"""

import asyncio
import shutil
import sys
import time
from pathlib import Path

from choreograph import Runtime
from choreograph.demo import create_app
from choreograph.demo.events import DeliveryRequested
from choreograph.demo.inspect_state import snapshot
from choreograph.demo.knobs import Knobs
from choreograph.demo.runner import sample_request
from choreograph.observe import Recorder, RecorderMiddleware


async def run(n, record):
    d = Path(f"/tmp/choreograph-bench-recorder-{record}")
    await asyncio.to_thread(shutil.rmtree, d, True)
    await asyncio.to_thread(d.mkdir)
    app = create_app(
        Knobs(rejection_rate=0, transient_error_rate=0, fleet_size=n, flight_seconds=0)
    )
    store = f"sqlite:///{d}/{{service}}.db"
    bus = f"sqlite:///{d}/bus.db"
    rt = Runtime(
        app, transport=bus, store=store, middleware=[RecorderMiddleware()] if record else []
    )
    rec = Recorder(app, bus, f"sqlite:///{d}/flows.db") if record else None
    async with rt:
        if rec:
            await rec.start()
        t0 = time.perf_counter()
        for j in range(n):
            req = sample_request(j)
            did = req.pop("delivery_id")
            async with rt.unit_of_work("ingestion", correlation_id=did) as uow:
                await uow.state.put("delivery", did, {"status": "requested"})
                uow.emit(DeliveryRequested(delivery_id=did, **req))
        while (await snapshot(store)).terminal < n:  # noqa: ASYNC110 - polls other databases
            await asyncio.sleep(0.1)
        el = time.perf_counter() - t0
        if rec:
            await rec.stop()
    return n / el


async def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1500
    res = {False: [], True: []}
    for _ in range(3):
        for record in (False, True):
            res[record].append(await run(n, record))
    for k, v in res.items():
        print(
            ("with recorder   " if k else "without recorder"),
            " ".join(f"{x:.0f}" for x in v),
            "median",
            sorted(v)[1],
        )


asyncio.run(main())
