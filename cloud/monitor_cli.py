"""``tandem monitor``: a model's drift and live quality, from a server or an agent, as a report and a plot.

Reads ``GET {server}/v1/monitor/{model}`` (cloud/monitor.py) or an agent's ``monitor.json`` (the file
the agent keeps in its data directory, edge/agent/monitor.py), prints a report (summary score
against the threshold, the most drifted features, input quality, live quality, the monitor's own
cost) and writes a PNG: reference vs live histograms of the most drifted features, and the score
and quality over time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tandem.shared.errors import InvalidInput, NotFound, TandemError, Unavailable

__all__ = ["fetch", "monitor", "plot", "render_report"]


def monitor(parser: argparse.ArgumentParser) -> None:
    """Report a model's data drift and live quality (server or agent) and plot it."""
    parser.add_argument("source", help="a server URL (http://host:port), or an agent's data directory or monitor.json")
    parser.add_argument("--model", default=None, help="the model (default: the only one monitored)")
    parser.add_argument("--version", dest="model_version", default=None, help="the model version (server; default: the newest)")
    parser.add_argument("--top", type=int, default=3, help="drifted features to list and plot (1-12, default 3)")
    parser.add_argument("--out", default="monitor.png", help="the plot to write (default: monitor.png)")
    parser.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")
    parser.add_argument("--json", action="store_true", help="print the monitor's JSON instead of the report")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if not 1 <= args.top <= 12:
        raise InvalidInput(f"--top must be 1..12, got {args.top}")
    doc = fetch(args.source, args.model, args.model_version, api_key=args.api_key, top=max(10, args.top))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(render_report(doc, args.top), end="")
    out = plot(doc, Path(args.out), args.top)
    print(f"plot: {out}")
    return 0


def _get(url: str, api_key: str | None) -> Any:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        if e.code == 404:
            raise NotFound(f"{url}: {message}") from None
        raise TandemError(f"{url} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise Unavailable(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    except ValueError:
        raise TandemError(f"{url} did not answer JSON") from None


def fetch(source: str, model: str | None, version: str | None = None, *, api_key: str | None = None, top: int = 10) -> dict[str, Any]:
    """The monitor document of ``model`` from a server URL or an agent's data directory / monitor.json."""
    if source.startswith(("http://", "https://")):
        base = source.rstrip("/")
        if model is None:
            listed = _get(f"{base}/v1/monitor", api_key)
            names = sorted({m["model"] for m in listed.get("models", []) if m.get("monitored")})
            if len(names) != 1:
                raise InvalidInput("name the model with --model: " + (
                    f"{base} monitors {', '.join(names)}" if names else f"{base} monitors no model"))
            model = names[0]
        path = f"/v1/monitor/{urllib.parse.quote(model, safe='')}"
        if version is not None:
            path += f"/versions/{urllib.parse.quote(version, safe='')}"
        return _get(f"{base}{path}?top={top}", api_key)
    p = Path(source)
    if p.is_dir():
        p = p / "monitor.json"
    if not p.is_file():
        raise NotFound(f"{source} is neither a server URL (http://...) nor an agent data directory holding monitor.json")
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{p} is not a monitor file: {e}") from None
    models = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(models, dict):
        raise InvalidInput(f"{p} is not a monitor file (no 'models')")
    if model is None:
        if len(models) != 1:
            raise InvalidInput(f"name the model with --model: {p} holds {', '.join(sorted(models)) or 'none'}")
        model = next(iter(models))
    if model not in models:
        raise NotFound(f"{p} has no model {model!r}; it holds {', '.join(sorted(models)) or 'none'}")
    return models[model]


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_report(doc: dict[str, Any], top: int = 3) -> str:
    lines = []
    state = "DRIFTING" if doc.get("drifting") else ("ok" if doc.get("score") is not None else "warming up")
    lines.append(f"{doc['model']}:{doc['version']} ({doc.get('tier', '?')}): {state}")
    lines.append(f"  drift score {_fmt(doc.get('score'))} (largest PSI; threshold {doc['threshold']:g}), mean PSI "
                 f"{_fmt(doc.get('mean_psi'))}, window {doc.get('window_rows', 0)} of {doc.get('window')} rows "
                 f"(scored from {doc.get('min_rows')})")
    feats = doc.get("features") or []
    if feats:
        lines.append(f"  {'feature':<22}{'PSI':>8}{'KS':>8}{'ref mean':>11}{'live mean':>11}")
        for f in feats[:top]:
            lines.append(f"  {f['name']:<22}{f['psi']:>8.3f}{f['ks']:>8.3f}{_fmt(f['reference_mean'], '.4f'):>11}"
                         f"{_fmt(f.get('live_mean'), '.4f'):>11}")
    q = doc.get("input_quality") or {}
    if q:
        lines.append(f"  input quality: {q.get('rows', 0)} rows; NaN/Inf {q.get('nonfinite', 0)}, out of range "
                     f"{q.get('out_of_range', 0)}, unseen categories {q.get('unseen_category', 0)}, length outliers "
                     f"{q.get('length_outlier', 0)}")
    lq = doc.get("live_quality") or {}
    v = doc.get("validation") or {}
    parts = []
    if lq.get("labelled"):
        parts.append(f"accuracy {_fmt(lq.get('accuracy'))} on {lq['labelled']} labelled (edge {_fmt(lq.get('edge_accuracy'))})")
    if lq.get("escalations_compared"):
        parts.append(f"edge agrees with cloud on {_fmt(lq.get('escalation_agreement'))} of {lq['escalations_compared']} escalations")
    if lq.get("edge_share") is not None:
        parts.append(f"edge answered {_fmt(lq.get('edge_share'))} of calls")
    if lq.get("cascade_keep_share") is not None:
        parts.append(f"the cascade kept {_fmt(lq['cascade_keep_share'])} on the edge where calibration expects "
                     f"{_fmt(lq.get('expected_edge_share'))} (threshold {_fmt(lq.get('threshold'), '.2f')}, "
                     f"cascade accuracy {_fmt(lq.get('target'))})")
    lines.append("  live quality: " + ("; ".join(parts) if parts else "no labels or escalations yet"))
    if v:
        lines.append(f"  at build (validation, {v.get('n')} rows): edge-cloud agreement {_fmt(v.get('agreement'))}, "
                     f"edge accuracy {_fmt(v.get('edge_accuracy'))}, cloud accuracy {_fmt(v.get('cloud_accuracy'))}")
    edge = doc.get("edge_reports") or []
    if edge:
        last = edge[-1]
        lines.append(f"  agents: {len(edge)} recent drift report(s); the latest (version {last.get('version')}) scores "
                     f"{_fmt(last.get('score'))}{', DRIFTING' if last.get('drifting') else ''}")
    o = doc.get("overhead") or {}
    if o:
        lines.append(f"  monitor cost: {o.get('batches', 0)} batches, {o.get('skipped', 0)} skipped, "
                     f"{_fmt((o.get('cpu_share') or 0) * 100, '.2f')}% of a core, {_fmt((o.get('profile_bytes') or 0) / 1024, '.0f')} KiB")
    if doc.get("failed"):
        lines.append(f"  monitor failed: {doc['failed']}")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], out: Path, top: int = 3) -> Path:
    """Reference vs live histograms of the ``top`` most drifted features, and score/quality over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = {h["name"]: h for h in doc.get("histograms") or []}
    names = [f["name"] for f in (doc.get("features") or []) if f["name"] in hists][:top]
    cols = max(1, len(names)) + 1
    fig, axes = plt.subplots(1, cols, figsize=(4.2 * cols, 4.0))
    psi = {f["name"]: f["psi"] for f in doc.get("features") or []}
    for ax, name in zip(axes, names):
        h = hists[name]
        labels = [str(i) for i in range(len(h["edges"]) + 1)] if name.endswith(".class") else _bin_labels(h["edges"])
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], h["reference"], width=0.4, label="reference (validation)", color="#4c72b0")
        ax.bar([i + 0.2 for i in x], h["live"], width=0.4, label=f"live ({h['live_rows']} rows)", color="#dd8452")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, fontsize=6, ha="right")
        ax.set_title(f"{name}  PSI {psi.get(name, 0):.2f}", fontsize=9)
        ax.set_ylabel("share of rows")
        ax.legend(fontsize=7)
    if not names:
        axes[0].text(0.5, 0.5, "no live rows yet", ha="center", va="center")
        axes[0].set_axis_off()
    ax = axes[-1]
    hist = doc.get("history") or []
    if hist:
        t0 = hist[0]["t"]
        ts = [(p["t"] - t0) for p in hist]
        ax.plot(ts, [p.get("score") if p.get("score") is not None else float("nan") for p in hist], label="drift score", color="#c44e52")
        ax.axhline(doc["threshold"], color="#c44e52", linestyle=":", label=f"threshold {doc['threshold']:g}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("max PSI")
        other = ax.twinx()
        for key, color in (("accuracy", "#55a868"), ("escalation_agreement", "#8172b2"), ("edge_share", "#937860")):
            vals = [p.get(key) for p in hist]
            if any(v is not None for v in vals):
                other.plot(ts, [v if v is not None else float("nan") for v in vals], label=key.replace("_", " "), color=color)
        other.set_ylim(0, 1.05)
        other.set_ylabel("share")
        lines = ax.get_legend_handles_labels()
        more = other.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no history yet", ha="center", va="center")
    ax.set_title("over time", fontsize=9)
    state = "DRIFTING" if doc.get("drifting") else "ok"
    fig.suptitle(f"{doc['model']}:{doc['version']} ({doc.get('tier', '?')}): {state}, score {_fmt(doc.get('score'))}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bin_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all"]
    def g(v: float) -> str:
        return f"{v:.3g}"

    def atom(a: float, b: float) -> bool:
        # A bin just wide enough to hold one value the reference held many times (an atom) is that value.
        return b - a <= 1e-5 * max(1.0, abs(a))

    return ([f"<{g(edges[0])}"] + [f"={g(a)}" if atom(a, b) else f"{g(a)}-{g(b)}" for a, b in itertools.pairwise(edges)]
            + [f">={g(edges[-1])}"])
