"""Calling a ``torch.compile``-d function without dynamo once its graph exists.

The compiled Lion step calls one graph 7 times per step on all-MiniLM-L6-v2 (16 tensors each).
Through ``torch.compile`` every call pays dynamo's frame hooks, its guards (a Python shape
guard over 49 tensor sizes) and the bytecode that gathers the graph's inputs: ~180 us per call
on a 2-core CPU, 1.25 ms of a 13 ms step (measured, see the README). :class:`DirectCompiled`
compiles through dynamo as usual the first time a call *signature* is seen, keeps the inductor
callable dynamo's backend returned, and calls it directly for later calls of the same signature.

Skipping the guards is safe only because the caller vouches for what they check: the
signature it passes with each call must change whenever the graph could differ (the dtypes,
devices, tensor types and flags of the call), and the caller must guarantee the
shape facts the graph was traced under (here: every tensor 1-D and contiguous, a param, its
grad, momentum and residual of equal length, lengths of at least 2). A signature whose graph
inputs cannot be matched to the call's arguments is simply always called through dynamo.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

# How one graph input is read from a call's arguments: ("tensor", path) or ("size", path, dim);
# a path is the index into the arguments, then the index into that list (or None).
_Path = tuple[int, int | None]


def _tensor_paths(args: tuple[Any, ...]) -> Iterator[tuple[_Path, Tensor]]:
    for i, arg in enumerate(args):
        if isinstance(arg, Tensor):
            yield (i, None), arg
        elif isinstance(arg, (list, tuple)):
            for j, item in enumerate(arg):
                if isinstance(item, Tensor):
                    yield (i, j), item


def _input_reader(gm: torch.fx.GraphModule, example_inputs: list[Any], args: tuple[Any, ...]) -> list[tuple] | None:
    """How to rebuild the graph's inputs from a call's arguments, or None if some input cannot be
    traced back. Dynamo hands the backend the call's own tensors (matched here by identity) and,
    for every dynamic size, a symbol that some tensor input's shape carries."""
    by_id = {id(t): path for path, t in _tensor_paths(args)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return None
    size_of: dict[str, tuple] = {}
    for node, example in zip(placeholders, example_inputs):
        value = node.meta.get("example_value")
        if isinstance(example, Tensor) and isinstance(value, Tensor) and id(example) in by_id:
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt):
                    size_of.setdefault(str(size), ("size", by_id[id(example)], dim))
    reader: list[tuple] = []
    for node, example in zip(placeholders, example_inputs):
        if isinstance(example, Tensor):
            path = by_id.get(id(example))
            if path is None:
                return None
            reader.append(("tensor", path))
        elif isinstance(example, torch.SymInt) and str(node.meta.get("example_value")) in size_of:
            reader.append(size_of[str(node.meta["example_value"])])
        else:  # a constant or an unknown input: dynamo's guards would be needed
            return None
    return reader


def _reader_function(reader: list[tuple]) -> Callable[[tuple[Any, ...]], list[Any]]:
    """``reader`` as one list display, ``lambda a: [a[0][0], a[0][0].shape[0], ...]``: for 81
    inputs a Python loop took 13 us per call on this CPU, the list display 6 us. The source holds
    only the reader's integer indices."""
    items = []
    for entry in reader:
        i, j = entry[1]
        item = f"a[{int(i)}]" if j is None else f"a[{int(i)}][{int(j)}]"
        items.append(item if entry[0] == "tensor" else f"{item}.shape[{int(entry[2])}]")
    return eval("lambda a: [" + ", ".join(items) + "]")


def _detached(arg: Any) -> Any:
    if isinstance(arg, Tensor):
        return arg.detach()
    if isinstance(arg, (list, tuple)):
        return type(arg)(t.detach() if isinstance(t, Tensor) else t for t in arg)
    return arg


class DirectCompiled:
    """``fn`` compiled by ``torch.compile(dynamic=True, fullgraph=True)`` with inductor and
    ``options``; a call whose signature was compiled before skips dynamo.

    The caller passes each call's signature (any hashable; None for a call that must always go
    through dynamo, which then runs under the caller's config). ``patches`` is a factory of
    context managers (dynamo/fx config) entered around the other calls that go through dynamo,
    the only ones that compile (entering dynamo's config costs ~1 ms on this CPU, so a caller
    making many unsigned calls should enter it once around them).
    """

    def __init__(
        self,
        fn: Callable[..., None],
        *,
        options: dict[str, Any],
        patches: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self._options = options
        self._patches = patches
        self._dynamo = torch.compile(fn, dynamic=True, fullgraph=True, backend=self._compile)
        self._direct: dict[Hashable, tuple[Callable, Callable]] = {}
        self._pending: tuple[Hashable, tuple] | None = None  # (signature, args) of the call being compiled

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs, config_patches=self._options)
        if self._pending is not None:
            signature, args = self._pending
            reader = _input_reader(gm, example_inputs, args)
            if reader is not None:
                self._direct[signature] = (compiled, _reader_function(reader))
        return compiled

    @property
    def direct_signatures(self) -> int:
        """How many signatures are called without dynamo."""
        return len(self._direct)

    def __call__(self, signature: Hashable | None, *args: Any) -> None:
        direct = self._direct.get(signature) if signature is not None else None
        if direct is not None:
            compiled, read = direct
            compiled(*read(args))
        else:
            self._through_dynamo(signature, args)

    def _through_dynamo(self, signature: Hashable | None, args: tuple[Any, ...]) -> None:
        # Dynamo sees detached tensors: a view's link to its base would make it guard on the
        # base's shape and compile again whenever the bases differ (the direct calls ignore it).
        args = tuple(_detached(arg) for arg in args)
        self._pending = None if signature is None else (signature, args)
        try:
            if self._patches is None or signature is None:
                self._dynamo(*args)
            else:
                with self._patches():
                    self._dynamo(*args)
        finally:
            self._pending = None
