"""The server as a process: a bounded load test on loopback, and two replicas sharing one output folder.

Load test: concurrent clients (A1111, OpenAI and page-job requests) against `python -m sfumato.server` with a
small queue. Every request must either complete with its images or be refused cleanly with 429; the server
stays up; its resident memory stays flat after warm-up. The figures (requests, refusals, latency
percentiles, peak RSS) are printed, and written to $SFUMATO_LOADTEST_REPORT when set. Bounded in count
and time, loopback only. SFUMATO_LOADTEST_CLIENTS / _REQUESTS / _QUEUE change its size.

Replicas: two servers on two ports, one output folder, one client that round-robins between them as a
load balancer would, and reads job state and files from the replica that did *not* run the job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
psutil = pytest.importorskip("psutil")
import httpx  # noqa: E402

SIZE = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_processes(n: int, model, outdir, *extra: str):
    """n x `python -m sfumato.server` on free loopback ports, started together; yields [(process, base URL)];
    all stopped at the end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = []
    try:
        for _ in range(n):
            port = free_port()
            cmd = [sys.executable, "-m", "sfumato.server", "--model", str(model), "--port", str(port),
                   "--outdir", str(outdir), "--log-level", "warning", *extra]  # fmt: skip
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            started.append((proc, f"http://127.0.0.1:{port}/"))
        deadline = time.monotonic() + 240  # generous: a busy 2-core machine starts torch slowly
        for proc, url in started:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
                try:
                    if httpx.get(url + "healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start within 240 s")
                time.sleep(0.1)
        yield started
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


@pytest.mark.slow
def test_load_every_request_completes_or_is_refused_and_memory_stays_flat(tiny_bundle_path, tmp_path):
    clients = int(os.environ.get("SFUMATO_LOADTEST_CLIENTS", 5))
    per_client = int(os.environ.get("SFUMATO_LOADTEST_REQUESTS", 6))
    max_queue = os.environ.get("SFUMATO_LOADTEST_QUEUE", "2")
    time_limit = 300.0  # the whole test stops by itself
    with server_processes(1, tiny_bundle_path, tmp_path / "out", "--max-queue", max_queue, "--preview-interval", "-1") as [
        (proc, url)
    ]:
        server = psutil.Process(proc.pid)
        rss: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample_memory():
            while not stop.is_set():
                rss.append((time.monotonic(), server.memory_info().rss))
                time.sleep(0.05)

        # warm-up: one of each kind, so that lazy allocations (kernels, buffers) happen before we measure
        with httpx.Client(base_url=url, timeout=180) as c:
            assert c.post("sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": SIZE, "height": SIZE,
                                                    "batch_size": 2}).status_code == 200  # fmt: skip
            assert c.post("v1/images/generations", json={"prompt": "a dog", "steps": 2, "n": 2}).status_code == 200
        baseline = server.memory_info().rss
        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()

        results: list[tuple[str, int, float, bool]] = []  # kind, status, seconds, ok
        lock = threading.Lock()
        started = time.monotonic()

        def client(i: int):
            with httpx.Client(base_url=url, timeout=180) as c:
                for k in range(per_client):
                    if time.monotonic() - started > time_limit:
                        return
                    kind = ("a1111", "openai", "job")[(i + k) % 3]
                    t = time.monotonic()
                    ok = False
                    if kind == "a1111":
                        r = c.post("sdapi/v1/txt2img", json={"prompt": f"a cat {i} {k}", "steps": 2, "width": SIZE,
                                                             "height": SIZE, "seed": k, "batch_size": 1 + k % 2})  # fmt: skip
                        ok = r.status_code == 200 and len(r.json()["images"]) == 1 + k % 2
                    elif kind == "openai":
                        r = c.post("v1/images/generations", json={"prompt": f"a dog {i}", "steps": 2, "n": 1})
                        ok = r.status_code == 200 and len(r.json()["data"]) == 1
                    else:
                        r = c.post("api/jobs", json={"prompt": f"a horse {i}", "steps": 2, "width": SIZE,
                                                     "height": SIZE})  # fmt: skip
                        if r.status_code == 202:
                            job = r.json()["id"]
                            while time.monotonic() - t < 180:
                                s = c.get(f"api/jobs/{job}").json()
                                if s["status"] not in ("queued", "running"):
                                    break
                                time.sleep(0.05)
                            ok = s["status"] == "done" and len(s["images"]) == 1
                            r = httpx.Response(200 if ok else 500)
                    if r.status_code == 429:
                        ok = True  # refused cleanly: counted, not retried
                    with lock:
                        results.append((kind, r.status_code, time.monotonic() - t, ok))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(time_limit + 60)
        wall = time.monotonic() - started
        stop.set()
        sampler.join(5)

        health = httpx.get(url + "healthz", timeout=5).json()
        assert proc.poll() is None and health["status"] == "ok" and not health["running"] and health["queued"] == 0

    statuses = [s for _, s, _, _ in results]
    completed = [sec for _, s, sec, _ in results if s == 200]
    refused = statuses.count(429)
    peak = max(r for _, r in rss)
    report = {
        "clients": clients, "max_queue": int(max_queue), "requests": len(results), "completed": len(completed), "refused_429": refused,
        "other": len(results) - len(completed) - refused, "wall_s": round(wall, 2),
        "latency_s": {q: round(percentile(completed, float(q[1:])), 3) for q in ("p50", "p95", "p99")},
        "rss_mib": {"after_warmup": round(baseline / 2**20, 1), "peak": round(peak / 2**20, 1),
                    "end": round(rss[-1][1] / 2**20, 1)},
    }  # fmt: skip
    print("load test:", json.dumps(report))
    if os.environ.get("SFUMATO_LOADTEST_REPORT"):
        with open(os.environ["SFUMATO_LOADTEST_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert len(results) == clients * per_client
    assert all(ok for *_, ok in results), [r for r in results if not r[3]]
    assert set(statuses) <= {200, 429}
    assert completed
    if clients > int(max_queue) + 1:
        assert refused, "more clients than the queue holds: some requests should have been refused"
    # flat memory: 2 x 32 px images per job cost kilobytes; a leak of one job's tensors per request would
    # show as steady growth. Allow allocator noise.
    assert peak - baseline < 96 * 2**20, report


@pytest.mark.slow
def test_two_replicas_serve_one_client_through_the_shared_output_folder(tiny_bundle_path, tmp_path):
    outdir = tmp_path / "shared"
    with server_processes(2, tiny_bundle_path, outdir) as [(_, a), (_, b)]:
        replicas = [a, b]
        with httpx.Client(timeout=180) as c:
            # stateless requests: any replica gives the same image for the same request
            body = {"prompt": "a cat", "steps": 3, "width": SIZE, "height": SIZE, "seed": 5}
            images = [c.post(u + "sdapi/v1/txt2img", json=body).json()["images"][0] for u in replicas]
            assert images[0] == images[1]

            # jobs round-robin over the replicas; each job's state is read from the *other* one
            jobs = []
            for k in range(4):
                r = c.post(replicas[k % 2] + "api/jobs", json={**body, "seed": k, "steps": 2})
                assert r.status_code == 202
                jobs.append((r.json()["id"], replicas[(k + 1) % 2]))
            files = set()
            for job, other in jobs:
                deadline = time.monotonic() + 180
                while (s := c.get(other + f"api/jobs/{job}").json())["status"] in ("queued", "running"):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert s["status"] == "done", s
                name = s["images"][0]["file"]
                png = c.get(other + f"outputs/{name}")
                assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
                files.add(name)
            # both galleries show every image, whichever replica made it
            for u in replicas:
                assert files <= {g["file"] for g in c.get(u + "api/outputs").json()}

            # a job running on replica a is cancelled through replica b
            long = c.post(a + "api/jobs", json={**body, "steps": 150}).json()["id"]
            deadline = time.monotonic() + 180
            while c.get(b + f"api/jobs/{long}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert c.post(b + f"api/jobs/{long}/cancel").status_code == 200
            while (s := c.get(b + f"api/jobs/{long}").json())["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert s["status"] == "interrupted" and s["step"] < 150
