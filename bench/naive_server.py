"""The reference a serving framework has to beat: one aiohttp handler, one ``session.run`` per request.

Speaks Tandem's native protocol (``POST /v1/models/{model}/infer``, msgpack, the shared codec), so the
load generator sends the very same bytes to it as to ``tandem serve``. No batching, no queue: each
request decodes, runs batch-1 in a thread pool, encodes. This is what most hand-written model
servers look like.

    python bench/naive_server.py MODEL.onnx --port 8100 [--name NAME] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import onnxruntime as ort
from aiohttp import web

from tandem.shared.errors import TandemError
from tandem.shared.protocol import CONTENT_TYPE, InferRequest, InferResponse, error_body


def make_app(model_path: str, name: str, threads: int) -> web.Application:
    opts = ort.SessionOptions()
    # One intra-op thread per session call and `threads` calls at once: all cores busy, none
    # oversubscribed (the fair setting for per-request batch-1 work).
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="naive-infer")

    async def infer(request: web.Request) -> web.Response:
        try:
            req = InferRequest.from_wire(await request.read())
            outputs = await asyncio.get_running_loop().run_in_executor(pool, session.run, None, req.inputs)
        except TandemError as e:
            return web.Response(body=error_body(e.message, e.code), status=e.status, content_type=CONTENT_TYPE)
        names = [o.name for o in session.get_outputs()]
        body = InferResponse(dict(zip(names, outputs)), name, "1", req.id).to_wire()
        return web.Response(body=body, content_type=CONTENT_TYPE)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/models/{model}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    app.on_cleanup.append(lambda _app: asyncio.to_thread(pool.shutdown))
    print(f"naive server: {name} on {session.get_providers()[0]}, {threads} threads", flush=True)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--name", default="model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    web.run_app(make_app(a.model, a.name, a.threads), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
