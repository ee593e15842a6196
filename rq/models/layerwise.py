"""Run many forward passes of one model *layer-major*: every pass advances to the next decoder layer, then the
next layer is loaded once for all of them.

Each pass (a calibration batch, one model's batch in eval, a ``generate`` call) runs in a worker thread of
its own, with the model's own forward code, its own masks, rotary embeddings and position biases. A forward
pre-hook on each decoder layer parks the worker there; when every worker is parked, the scheduler makes the
layer they wait at present (:meth:`LayerGroups.load`), resumes them one at a time in a fixed order until each
parks at its next layer or finishes, and releases the layer. Only one thread ever computes, so every pass
does exactly the operations on exactly the tensors that a plain sequential loop over the batches does: the
results are bit-identical, while the model's weights go through memory one layer at a time. What stays
resident between layers is what the passes themselves hold (hidden states, masks), as in llm-compressor's
sequential pipeline, which captures each layer's inputs for the whole calibration set.

A pass that visits a layer again (``generate``: every decode step) simply parks there again; the layer is
loaded again for that step.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn


class LayerGroups(Protocol):
    """What the scheduler drives: group ``g`` of layers made present, then released."""

    def load(self, group: int) -> None: ...

    def release(self, group: int) -> None: ...


class _Cancelled(BaseException):
    """Unwinds a parked worker when another pass failed."""


class _Worker(threading.Thread):
    def __init__(self, index: int, job: Callable[[], Any], grad: bool, turn: threading.Semaphore):
        super().__init__(name=f"rq-pass-{index}", daemon=True)
        self.index, self.job, self.grad, self.turn = index, job, grad, turn
        self.go = threading.Semaphore(0)
        self.waiting_at: int | None = None
        self.cancelled = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        _current.worker = self
        self.go.acquire()
        try:
            if not self.cancelled:
                with torch.set_grad_enabled(self.grad):
                    self.result = self.job()
        except _Cancelled:
            pass
        except BaseException as err:  # handed to the scheduler, raised there
            self.error = err
        finally:
            self.done = True
            self.turn.release()

    def park(self, group: int) -> None:
        """Called from the pre-hook in this worker's thread: wait until ``group`` is loaded and it is our turn."""
        self.waiting_at = group
        self.turn.release()
        self.go.acquire()
        if self.cancelled:
            raise _Cancelled


_current = threading.local()


class LayerScheduler:
    """Pre-hooks on ``layers`` (``group_of[i]`` is layer ``i``'s group) and the layer-major loop over passes."""

    def __init__(self, groups: LayerGroups, layers: Sequence[nn.Module], group_of: Sequence[int]):
        self.groups = groups
        self._handles = [layer.register_forward_pre_hook(self._hook(group), with_kwargs=True)
                         for layer, group in zip(layers, group_of)]
        self._direct_loaded: set[int] = set()
        self._post = [layer.register_forward_hook(self._post_hook(group), with_kwargs=True)
                      for layer, group in zip(layers, group_of)]

    def close(self) -> None:
        for handle in self._handles + self._post:
            handle.remove()

    def _hook(self, group: int):
        def hook(module, args, kwargs):
            worker = getattr(_current, "worker", None)
            if worker is not None:
                worker.park(group)
            else:  # a plain call outside run(): the layer is loaded for this call only
                self.groups.load(group)
                self._direct_loaded.add(group)
        return hook

    def _post_hook(self, group: int):
        def hook(module, args, kwargs, output):
            if getattr(_current, "worker", None) is None and group in self._direct_loaded:
                self._direct_loaded.discard(group)
                self.groups.release(group)
        return hook

    def run(self, jobs: Sequence[Callable[[], Any]], on_done: Callable[[int, Any], None] | None = None,
            sequential: bool = False) -> list[Any]:
        """Run every job (a forward pass) layer-major; returns their results in order, or, with ``on_done``,
        hands each result over as soon as its pass finishes (and keeps none). ``sequential``: one job after
        the other in this thread, each layer loaded when a call reaches it (for layers that stay once loaded:
        no thread hand-offs at all)."""
        if sequential:
            results = []
            for index, job in enumerate(jobs):
                result = job()
                if on_done is not None:
                    on_done(index, result)
                else:
                    results.append(result)
            return results
        turn = threading.Semaphore(0)
        workers = [_Worker(i, job, torch.is_grad_enabled(), turn) for i, job in enumerate(jobs)]
        results: list[Any] = [None] * len(workers)
        for worker in workers:
            worker.start()
        try:
            for worker in workers:  # each runs to its first layer (or to its end)
                self._step(worker, turn, results, on_done)
            while True:
                pending = [w for w in workers if not w.done]
                if not pending:
                    break
                group = min(w.waiting_at for w in pending)
                self.groups.load(group)
                try:
                    for worker in pending:
                        if worker.waiting_at == group:
                            worker.waiting_at = None
                            self._step(worker, turn, results, on_done)
                finally:
                    self.groups.release(group)
        finally:
            for worker in workers:
                if not worker.done:
                    worker.cancelled = True
                    worker.go.release()
                    turn.acquire()
            for worker in workers:
                worker.join()
        return results

    @staticmethod
    def _step(worker: _Worker, turn: threading.Semaphore, results: list, on_done) -> None:
        worker.go.release()
        turn.acquire()
        if worker.done:
            if worker.error is not None:
                raise worker.error
            result, worker.result = worker.result, None
            if on_done is not None:
                on_done(worker.index, result)
            else:
                results[worker.index] = result
