"""Build specs: every way a spec can be wrong gets a SpecError naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from build_support import DIGITS, write_tiny_spec
from tandem.quantize.errors import SpecError
from tandem.quantize.spec import BuildSpec, load_dataset, load_spec
from tandem.shared.cli import main


def test_digits_spec_loads_from_its_directory() -> None:
    spec = load_spec(DIGITS)
    assert spec.name == "digits"
    assert spec.source.endswith("spec.py")
    assert spec.effective_training(quick=True).teacher_epochs < spec.training.teacher_epochs
    assert {c.format for c in spec.effective_search(quick=True)} == {"qdq", "dynamic"}


def test_digits_load_data_is_reproducible_and_well_formed() -> None:
    from importlib.util import module_from_spec, spec_from_file_location

    s = spec_from_file_location("digits_spec_under_test", DIGITS / "spec.py")
    assert s is not None and s.loader is not None
    module = module_from_spec(s)
    s.loader.exec_module(module)
    a, b, c = module.load_data(0), module.load_data(0), module.load_data(1)
    for split in ("train", "val", "test"):
        x, y = a[split]
        assert x.dtype == np.float32 and x.shape[1] == 64 and 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, b[split][0])
    assert not np.array_equal(a["test"][0], c["test"][0])
    assert a["labels"] == [str(i) for i in range(10)]


def test_digits_spec_imports_and_loads_data_without_torch() -> None:
    # Other tiers import the spec for load_data() on machines without torch: block torch and try.
    code = (
        "import sys, importlib.util\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"s = importlib.util.spec_from_file_location('d', {str(DIGITS / 'spec.py')!r})\n"
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
        "print(m.load_data(0)['test'][0].shape, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(360, 64) False"


def test_toml_yaml_and_json_specs_resolve_factories(tmp_path: Path) -> None:
    toml = load_spec(write_tiny_spec(tmp_path / "t"))
    assert toml.name == "tiny" and callable(toml.teacher) and toml.search[0].name == "int8-dyn-mm"
    doc = {"name": "j", "teacher": f"{DIGITS / 'spec.py'}:teacher", "student": f"{DIGITS / 'spec.py'}:student",
           "load_data": f"{DIGITS / 'spec.py'}:load_data", "budgets": {"max_accuracy_drop": 0.02}}
    (tmp_path / "s.json").write_text(json.dumps(doc))
    assert load_spec(tmp_path / "s.json").budgets.max_accuracy_drop == 0.02
    (tmp_path / "s.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in doc.items()))
    assert load_spec(tmp_path / "s.yaml").name == "j"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: d, "is a directory without spec.py"),
        (lambda d: _write(d / "x.txt", "hi"), "a build spec is a directory, .py, .toml"),
        (lambda d: _write(d / "nospec.py", "X = 1\n"), "does not define SPEC"),
        (lambda d: _write(d / "boom.py", "raise ValueError('bad import')\n"), "importing"),
        (lambda d: _write(d / "bad.toml", "name = [\n"), "cannot be parsed"),
        (lambda d: _write(d / "bad.yaml", "name: [unclosed\n"), "cannot be parsed"),
        (lambda d: _write(d / "list.json", "[1, 2]"), "must be a mapping"),
    ],
)
def test_unloadable_specs(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SpecError, match=message):
        load_spec(setup(tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"teacher": '"no_such_module_xyz:teacher"'}, r"teacher: cannot import module 'no_such_module_xyz'"),
        ({"teacher": '"tiny_models.py:missing"'}, r"teacher: .*has no attribute 'missing'"),
        ({"student": '"missing_file.py:student"'}, r"spec file .*missing_file.py does not exist"),
        ({"teacher": '"no-colon"'}, r"teacher: 'no-colon' must look like 'module:attr'"),
        ({"teacher": "3"}, r"teacher: must be a callable"),
        ({"colour": '"red"'}, r"colour: Extra inputs are not permitted"),
        ({"name": "[1]"}, r"name: Input should be a valid string"),
        ({"name": '"../up"'}, r"name: String should match pattern"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, override: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(write_tiny_spec(tmp_path, **override))


def test_budget_out_of_range_is_named(tmp_path: Path) -> None:
    path = write_tiny_spec(tmp_path)
    path.write_text(path.read_text() + "\n[budgets]\nmin_speedup = 0.5\n")
    with pytest.raises(SpecError, match=r"budgets.min_speedup: Input should be greater than or equal to 1"):
        load_spec(path)


def _spec_with_data(fn) -> BuildSpec:  # type: ignore[no-untyped-def]
    return BuildSpec(name="d", teacher=lambda: None, student=lambda: None, load_data=fn, source="test")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must return a dict"),
        ({"train": (np.zeros((4, 2), np.float32), np.zeros(4, np.int64))}, "'val' must be an"),
        ({s: (np.zeros((4, 2)), np.zeros(4, np.int64)) for s in ("train", "val", "test")}, "x must be float32"),
        ({s: (np.zeros((4, 2), np.float32), np.zeros(3, np.int64)) for s in ("train", "val", "test")}, "one per x row"),
        ({s: (np.zeros((4, 2), np.float32), np.zeros(4, np.float32)) for s in ("train", "val", "test")}, "integer labels"),
        ({**{s: (np.zeros((4, 2), np.float32), np.arange(4)) for s in ("train", "val", "test")}, "labels": ["a"]},
         "1 labels for 4 classes"),
    ],
)
def test_bad_datasets_are_named(data: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_dataset(_spec_with_data(lambda seed=0: data), 0)


def test_cli_prints_a_clear_error_for_a_missing_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(tmp_path / "nowhere"), "--repository", str(tmp_path / "repo"),
                 "--key", str(tmp_path / "k.key")])
    assert code == 1
    assert f"error: build spec {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cli_arguments_and_defaults() -> None:
    from tandem.shared.cli import build_parser

    args = build_parser().parse_args(["build", "examples/digits", "--version", "7", "--quick", "--seed", "3"])
    assert (args.bundle_version, args.quick, args.seed) == ("7", True, 3)
    assert str(args.repository) == "artifacts/repository" and str(args.key) == "artifacts/keys/tandem.key"


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ("relation_weight = 1.0", r"training.relation_weight: the relational term distils an embedding .*"
                                  r"task is 'classification'.* set it to 0"),
        ("relation_weight = -1.0", r"training.relation_weight: Input should be greater than or equal to 0"),
        ("relation_temperature = 0", r"training.relation_temperature: Input should be greater than 0"),
        ('precision = "fp8"', r"training.precision: Input should be 'fp32' or 'bf16'"),
    ],
)
def test_bad_relation_settings_are_named(tmp_path: Path, training: str, message: str) -> None:
    path = write_tiny_spec(tmp_path)
    path.write_text(path.read_text().replace("[training]\n", f"[training]\n{training}\n"))
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_relation_settings_load_on_an_embedding_spec(tmp_path: Path) -> None:
    path = write_tiny_spec(tmp_path, task='{ kind = "embedding" }')
    path.write_text(path.read_text().replace("[training]\n", "[training]\nrelation_weight = 0.5\nrelation_temperature = 0.1\n"))
    training = load_spec(path).training
    assert (training.relation_weight, training.relation_temperature) == (0.5, 0.1)
