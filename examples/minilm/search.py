"""Semantic search over the standard library's documentation with the minilm bundle.

    python examples/minilm/search.py --bundle artifacts/repository/minilm/1 \
        --trusted-key artifacts/keys/tandem.pub [--cloud-url http://127.0.0.1:8000] "how do I read a file"

The index is the held-out test sentences embedded once in the cloud variant's space; each query is
embedded through ``HybridClient`` (the cascade: on the device when its confidence head says the
edge embedding is close enough to the teacher's, else in the cloud) and answered by cosine
similarity. The route printed says where the query ran and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np

from tandem.edge import Budget, HybridClient
from tandem.shared.bundle import load_bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def _sibling(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"minilm_search_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--trusted-key", type=Path, required=True)
    ap.add_argument("--cloud-url", default=None)
    ap.add_argument("--corpus", type=int, default=300, help="sentences in the index (default 300)")
    ap.add_argument("queries", nargs="*", default=["how do I read a file", "wait for several threads to finish"])
    args = ap.parse_args()

    models, data = _sibling("models"), _sibling("data")
    corpus = data.split_sentences(0, quick=True)["test"][: args.corpus]
    bundle = load_bundle(args.bundle, args.trusted_key)
    with HybridClient(bundle, args.cloud_url) as client:
        # Index once, with the best variant available (the cloud's when it is reachable).
        policy = "cloud-only" if args.cloud_url else "edge-only"
        index = np.concatenate([
            client.infer(models.tokenize(corpus[i : i + 32]), Budget(policy=policy, latency_ms=60_000)).outputs["embedding"]
            for i in range(0, len(corpus), 32)
        ])
        for query in args.queries:
            result = client.infer(models.tokenize([query]), Budget(latency_ms=5_000))
            scores = index @ result.outputs["embedding"][0]
            r = result.route
            print(f"\n{query!r}  ran on the {r.tier} ({r.latency_ms:.1f} ms; {r.reason})")
            for i in np.argsort(-scores)[:3]:
                print(f"  {scores[i]:.3f}  {corpus[i][:110]}")


if __name__ == "__main__":
    main()
