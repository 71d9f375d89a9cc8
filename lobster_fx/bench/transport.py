"""Sending torch modules to a benchmark worker: save them to a file it can load.

:func:`_save_torch_model` is ``torch.save`` with GraphModules stored as their
generated code, rebuilt on load by :func:`_rebuild_code_module` (which the
pickle names by its import path ``lobster_fx.bench.transport._rebuild_code_module``:
torch workers put the parent's ``sys.path`` first, so it imports there).
:func:`_file_sha256` is the digest the worker checks before unpickling.
"""

from __future__ import annotations

from typing import Any


def _rebuild_code_module(body: dict[str, Any], import_block: str) -> Any:
    """Unpickle a GraphModule as a plain module running its generated code.

    ``torch.load`` of a GraphModule normally *re-traces* that code, which fails
    for functions that run but do not trace (e.g. ``csr_linear`` of
    :func:`lobster_fx.passes.csr.to_sparse_csr`); for timing we only need to run it.
    """
    import types

    import torch

    namespace: dict[str, Any] = {}
    code = body.get("_code") or body["code"]
    exec(compile(import_block + code, "<lobster_fx.bench GraphModule>", "exec"), namespace)  # noqa: S102
    m = torch.nn.Module()
    m.__dict__.update(body)
    m.forward = types.MethodType(namespace["forward"], m)
    return m


def _save_torch_model(model: Any, path: str) -> None:
    """``torch.save`` with GraphModules stored as code (see :func:`_rebuild_code_module`)."""
    import copy
    import pickle
    import types

    import torch

    def is_graphs(v: Any) -> bool:
        if isinstance(v, torch.fx.Graph):
            return True
        return isinstance(v, dict) and bool(v) and all(isinstance(g, torch.fx.Graph) for g in v.values())

    class _Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, torch.fx.GraphModule):
                from lobster_fx.graph.trace import LobsterGraphModule

                if isinstance(obj, LobsterGraphModule):
                    # timing needs the current mode only: reduce it as a plain GraphModule
                    obj = torch.fx.GraphModule(obj, copy.deepcopy(obj.graph), class_name=type(obj).__name__)
                reduced = torch.fx.GraphModule.__reduce__(obj)
                if isinstance(reduced, tuple) and len(reduced) == 2 and len(reduced[1]) == 2:
                    body, import_block = reduced[1]
                    if isinstance(body, dict) and isinstance(import_block, str) and ("_code" in body or "code" in body):
                        # graphs are not needed to run the code (and may not pickle)
                        body = {k: v for k, v in body.items() if not is_graphs(v)}
                        return _rebuild_code_module, (body, import_block)
            return NotImplemented

    pickle_module = types.ModuleType("lobster_fx_bench_pickle")
    pickle_module.Pickler = _Pickler  # type: ignore[attr-defined]
    pickle_module.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]
    pickle_module.load = pickle.load  # type: ignore[attr-defined]
    pickle_module.dump = pickle.dump  # type: ignore[attr-defined]
    torch.save(model, path, pickle_module=pickle_module)


def _file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

