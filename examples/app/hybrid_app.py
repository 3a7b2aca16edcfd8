"""An app that embeds Tandem's HybridClient: the same model on the device and in the cloud, routed per call.

    python examples/app/hybrid_app.py --bundle REPO/digits/1 --trusted-key keys/tandem.pub \
        [--cloud-url http://127.0.0.1:8000] [--api-key KEY]

It classifies a few inputs synchronously under different budgets, then does the same from asyncio
with several calls in flight, and prints where each call ran and why. Without ``--cloud-url`` (or
with the cloud down) every call is answered on the device. Inputs are the bundle's own samples, so
the example works for any bundle.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np

from tandem.edge.budget import Budget
from tandem.edge.client import HybridClient
from tandem.shared.bundle import load_bundle


def show(label: str, result) -> None:  # type: ignore[no-untyped-def]
    scores = next(iter(result.outputs.values()))
    r = result.route
    print(f"{label:<28} class {int(np.argmax(scores[0]))}  tier={r.tier:<5} {r.latency_ms:7.2f} ms  "
          f"cost={r.cost:.4f}  reason={r.reason}")


def sync_part(client: HybridClient, x: np.ndarray) -> None:
    print("-- sync --")
    show("default (cascade)", client.infer(x))
    show("local_only (privacy)", client.infer(x, Budget(local_only=True)))
    show("cloud-only, 1 s budget", client.infer(x, Budget(policy="cloud-only", latency_ms=1000)))
    show("constrained: 30 ms, free", client.infer(x, Budget(policy="constrained", latency_ms=30, max_cost=0.0)))


async def async_part(client: HybridClient, xs: np.ndarray) -> None:
    print("-- async, 8 calls in flight --")
    results = await asyncio.gather(*(client.ainfer(xs[i % len(xs)][None], Budget(latency_ms=500)) for i in range(8)))
    for i, res in enumerate(results):
        show(f"ainfer #{i}", res)


async def main_async(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle, args.trusted_key, variants=["edge"])
    inputs, _ = bundle.load_samples()
    xs = next(iter(inputs.values()))
    # One client per app, closed on exit: it owns the edge session and the cloud connection pool.
    async with HybridClient(bundle, args.cloud_url, api_key=args.api_key) as client:
        await asyncio.to_thread(sync_part, client, xs[:1])
        await async_part(client, xs)
        print(f"edge providers in use: {client.providers}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a bundle directory (only its edge variant is needed)")
    p.add_argument("--trusted-key", required=True, help="the publisher's public key (tandem.pub)")
    p.add_argument("--cloud-url", default=None)
    p.add_argument("--api-key", default=None)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
