"""A server on a free loopback port in a background thread, for tests and notebooks:

    with serve_in_thread(create_app(pipe)) as url:
        requests.post(url + "sdapi/v1/txt2img", json={...})
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 20.0):
    """Run `app` under uvicorn on host:port (0: a free port) until the block ends; yields the base URL
    ("http://127.0.0.1:PORT/")."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="sfumato-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the test server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/"
    finally:
        server.should_exit = True
        thread.join(timeout)
