"""The HTTP stack's ceiling, for comparison: a raw ASGI app that reads the request body and answers a fixed JSON.

No framework, no parsing, no model: what the HTTP server and the load generator cost by themselves on this
machine. ``bench/run.py`` serves it exactly as our service is served (``moviematch_ml.online.supervisor.run``:
uvicorn with httptools and uvloop, a listening socket per worker) and drives its ``/predict`` next to ours, so the
table says how close our service comes to the ceiling (the issue puts the target at about half of it).

    python bench/ceiling_app.py PORT WORKERS
"""

from __future__ import annotations

import sys
from typing import Any

ANSWER = b'{"predicted_rating":7.123,"model_version":"ceiling","source":"model","prediction_id":"0"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan and anything else: nothing to set up
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        return
    more = True
    while more:  # read the whole body, as any real endpoint must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    from moviematch_ml.online import supervisor

    supervisor.run(
        host="127.0.0.1",
        port=int(sys.argv[1]),
        workers=int(sys.argv[2]),
        app="ceiling_app:app",
        factory=False,
        log_level="warning",
        access_log=False,
        loop="auto",
        http="auto",
    )
