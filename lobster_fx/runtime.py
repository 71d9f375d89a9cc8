"""Which ONNX Runtime build is installed: one, chosen at install time.

lobster_fx does not depend on a runtime directly: ``pip install lobster_fx[cpu]``
installs ``onnxruntime``, ``pip install lobster_fx[gpu]`` installs
``onnxruntime-gpu``. The two builds install the same ``onnxruntime`` package
directory, so with both present the last one installed wins, usually the CPU
build, which hides the CUDA provider. Every entry point that needs a runtime
calls :func:`import_onnxruntime`, which says how to fix a missing or doubled
runtime instead of failing later with a bare ``ImportError`` or a CPU fallback.

Example::

    >>> from lobster_fx.runtime import import_onnxruntime, installed_runtimes
    >>> len(installed_runtimes()) >= 1
    True
    >>> import_onnxruntime().__name__
    'onnxruntime'
"""

from __future__ import annotations

import importlib.metadata
from types import ModuleType

__all__ = ["RUNTIME_DISTRIBUTIONS", "import_onnxruntime", "installed_runtimes", "runtime_conflict"]

#: distributions that each install the ``onnxruntime`` Python package
RUNTIME_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)

INSTALL_HINT = "pip install 'lobster_fx[cpu]' (or 'lobster_fx[gpu]' for the CUDA provider)"


def installed_runtimes() -> list[str]:
    """The ONNX Runtime distributions installed in this environment."""
    found = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def runtime_conflict(runtimes: list[str] | None = None) -> str | None:
    """A message when more than one runtime build is installed, else None."""
    runtimes = installed_runtimes() if runtimes is None else runtimes
    if len(runtimes) < 2:
        return None
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in runtimes else runtimes[-1]
    return (
        f"several ONNX Runtime builds are installed ({', '.join(runtimes)}); they share one package "
        f"directory and the last installed hides the others' providers. Keep one: "
        f"pip uninstall -y {' '.join(runtimes)} && pip install {keep}"
    )


def import_onnxruntime() -> ModuleType:
    """``import onnxruntime``, or an ImportError that says which extra to install."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"lobster_fx needs ONNX Runtime for this and none is installed: {INSTALL_HINT}") from e
    return onnxruntime
