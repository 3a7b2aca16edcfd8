"""torch -> ONNX with every declared dynamic axis kept dynamic and named, checked against torch.

The graph's outputs are exported under placeholder names and renamed afterwards: the exporter
names internal values after modules and ops, and an output called like one of them (an output
``embedding`` beside an ``nn.Embedding``) would make a graph onnxruntime refuses to load.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportMismatch

log = logging.getLogger(__name__)

OPSET = 18
_PLACEHOLDER = "tandem_export_output_{}"


def _decl_shapes(inputs: Sequence[Any]) -> list[list[int | str]]:
    return [list(d.shape or ["batch"]) for d in inputs]


def _example_rows(example: Mapping[str, np.ndarray], shapes: list[list[int | str]], names: list[str]) -> int:
    """A batch size for the traced example that differs from every dynamic axis' length: torch.export
    would otherwise take two equal sizes for one and the same dimension."""
    lengths = {example[n].shape[i] for n, shape in zip(names, shapes) for i, d in enumerate(shape) if i > 0 and isinstance(d, str)}
    n_rows = len(next(iter(example.values())))
    for b in (2, 3, 5, 7):
        if b not in lengths and b <= n_rows:
            return b
    return min(n_rows, 2)


def export_onnx(
    model: Any,
    example: np.ndarray | Mapping[str, np.ndarray],
    path: str | Path,
    *,
    input_name: str = "input",
    output_name: str = "logits",
    inputs: Sequence[Any] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` (eval mode) to one self-contained ``.onnx`` file.

    ``inputs`` are the spec's input declarations (name, shape with named dynamic axes); without them
    the model takes one input ``input_name`` whose batch axis alone is dynamic. Inputs sharing an
    axis name share one dynamic dimension.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    if inputs is None:
        arr = np.asarray(example)
        names, shapes = [input_name], [["batch", *arr.shape[1:]]]
        example = {input_name: arr}
    else:
        names, shapes = [d.name for d in inputs], _decl_shapes(inputs)
        if not isinstance(example, Mapping):
            example = {names[0]: np.asarray(example)}
    outs = list(output_names) if output_names is not None else [output_name]
    rows = _example_rows(example, shapes, names)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n][:rows])) for n in names)
    dims: dict[str, Any] = {}
    dynamic = tuple(
        {i: dims.setdefault(d, torch.export.Dim(d, min=1, max=1 << 20)) for i, d in enumerate(shape) if isinstance(d, str)}
        for shape in shapes
    )
    # The exporter warns about torchvision ops on every call; they are irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                args,
                input_names=names,
                output_names=[_PLACEHOLDER.format(i) for i in range(len(outs))],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as e:
        raise ExportMismatch(f"{path.name}: torch.onnx.export failed with dynamic axes {sorted(dims)}: "
                             f"{type(e).__name__}: {_first_lines(e)}") from None
    if program is None:
        raise ExportMismatch(f"{path.name}: torch.onnx.export returned no program")
    # Weights inline (one file per variant: the manifest hashes files one by one).
    program.save(str(path), external_data=False)
    _rename_outputs(path, outs)
    return path


def _rename_outputs(path: Path, names: list[str]) -> None:
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    if len(g.output) != len(names):
        raise ExportMismatch(f"{path.name}: the model returns {len(g.output)} output(s); the spec declares "
                             f"{len(names)} ({names})")
    taken = {v for n in g.node for v in (*n.input, *n.output)} | {i.name for i in g.initializer} | {i.name for i in g.input}
    mapping: dict[str, str] = {}
    for name in names:
        if name in taken:  # an internal value already has the wanted name: move it aside
            alt, k = f"{name}__internal", 1
            while alt in taken:
                alt, k = f"{name}__internal{k}", k + 1
            mapping[name] = alt
            taken.add(alt)
    for i, name in enumerate(names):
        mapping[g.output[i].name] = name

    def rename(v: str) -> str:
        return mapping.get(v, v)

    for node in g.node:
        node.input[:] = [rename(v) for v in node.input]
        node.output[:] = [rename(v) for v in node.output]
    for init in g.initializer:
        init.name = rename(init.name)
    for vi in (*g.input, *g.output, *g.value_info):
        vi.name = rename(vi.name)
    onnx.save(model, str(path))


def _first_lines(e: BaseException, n: int = 3) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:n])[:400]


def _torch_outputs(model: Any, feeds: Mapping[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names))
    if isinstance(out, torch.Tensor):
        out = (out,)
    return [t.detach().numpy() for t in out]


def check_cases(
    example: Mapping[str, np.ndarray], inputs: Sequence[Any], batch_sizes: tuple[int, ...] = (1, 7)
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(description, feeds) at two sizes of every dynamic axis: the batch at ``batch_sizes``, and
    every padded axis at its full length and about a third of it (inputs sharing the axis cut alike).
    A dynamic axis without a pad value is only tried at the data's length: cutting it could make an
    input the model never sees."""
    n_rows = len(next(iter(example.values())))
    cases = [(f"batch {b}", {k: v[:b] for k, v in example.items()}) for b in batch_sizes if b <= n_rows]
    axes: dict[str, list[tuple[str, int]]] = {}
    for d in inputs:
        for i, axis in enumerate(d.shape or []):
            if i > 0 and isinstance(axis, str) and d.pad is not None:
                axes.setdefault(axis, []).append((d.name, i))
    b = min(3, n_rows)
    for axis, members in axes.items():
        full = example[members[0][0]].shape[members[0][1]]
        short = max(1, full // 3)
        if short == full:
            continue
        feeds = {k: v[:b] for k, v in example.items()}
        for name, i in members:
            feeds[name] = np.ascontiguousarray(np.take(feeds[name], np.arange(short), axis=i))
        cases.append((f"{axis} {short} (batch {b})", feeds))
    return cases


def verify_export(
    model: Any,
    path: str | Path,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    batch_sizes: tuple[int, ...] = (1, 7),
    decls: Sequence[Any] | None = None,
) -> float:
    """Load the export with ONNX Runtime and run it and torch on the same real inputs at two sizes
    of every dynamic axis; raise :class:`ExportMismatch` naming the cause (the graph does not load,
    does not run at some size, or disagrees with torch) . Returns the largest abs difference."""
    import onnxruntime as ort

    model.eval()
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportMismatch(f"{Path(path).name}: ONNX Runtime cannot load the exported graph: {_first_lines(e)}") from None
    names = [i.name for i in sess.get_inputs()]
    if not isinstance(inputs, Mapping):
        inputs = {names[0]: np.asarray(inputs)}
    cases = check_cases(inputs, decls, batch_sizes) if decls is not None else (
        [(f"batch {b}", {k: v[:b] for k, v in inputs.items()}) for b in batch_sizes
         if b <= len(next(iter(inputs.values())))] + [(f"batch {len(next(iter(inputs.values())))}", dict(inputs))])
    worst = 0.0
    for what, feeds in cases:
        try:
            expected = _torch_outputs(model, feeds, names)
        except Exception as e:
            raise ExportMismatch(f"{Path(path).name}: the torch model itself fails at {what} ({type(e).__name__}: "
                                 f"{_first_lines(e, 1)}): a model declared with dynamic axes must take every size "
                                 "of them") from None
        try:
            got = sess.run(None, feeds)
        except Exception as e:
            raise ExportMismatch(f"{Path(path).name}: ONNX Runtime cannot run the export at {what}: {_first_lines(e)}") from None
        if len(got) != len(expected):
            raise ExportMismatch(f"{Path(path).name}: the graph has {len(got)} outputs, torch returns {len(expected)}")
        for out_name, g, want in zip((o.name for o in sess.get_outputs()), got, expected):
            if g.shape != want.shape:
                raise ExportMismatch(
                    f"{Path(path).name}: ONNX output shape {g.shape} != torch {want.shape} at {what} (output {out_name})"
                )
            if g.dtype.kind == "f":
                diff = np.abs(g.astype(np.float64) - want)
                worst = max(worst, float(diff.max(initial=0.0)))
                if not np.allclose(g, want, rtol=rtol, atol=atol):
                    i = np.unravel_index(int(diff.argmax()), diff.shape)
                    raise ExportMismatch(
                        f"{Path(path).name}: ONNX Runtime output differs from torch by {float(diff.max()):.3g} "
                        f"at {tuple(int(j) for j in i)} ({what}, output {out_name}; tolerance rtol={rtol}, "
                        f"atol={atol}): the model does something the exporter did not capture"
                    )
            elif not np.array_equal(g, want):
                raise ExportMismatch(f"{Path(path).name}: ONNX output {out_name} differs from torch at {what}")
    log.debug("export %s matches torch (max abs diff %.2e)", Path(path).name, worst)
    return worst
