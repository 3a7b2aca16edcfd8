"""Build errors: each says which step refused and why, so ``tandem build`` prints one clear line."""

from __future__ import annotations

from tandem.shared.errors import TandemError


class BuildError(TandemError):
    """A build could not produce a bundle."""

    status = 422
    code = "build_failed"


class SpecError(BuildError):
    """The build spec is missing, malformed, or names a factory that cannot be found."""

    code = "bad_spec"


class ExportMismatch(BuildError):
    """ONNX Runtime's outputs on the exported graph differ from torch's beyond tolerance."""

    code = "export_mismatch"


class BudgetError(BuildError):
    """No variant for a required role stays within the accuracy, speed and size budgets."""

    code = "over_budget"
