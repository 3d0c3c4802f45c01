"""The enclave's worker pool: a bounded job queue, decoding workers, shared interpreters.

Nothing here logs an image or a label: log lines name failures by kind only.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator

from nitrolesion.errors import Busy, ImageError, NitroLesionError
from nitrolesion.memory_budget import MIB, MemoryBudget, Reservation
from nitrolesion.model.classifier import Classifier, LesionModel, Prediction, usable_cpus
from nitrolesion.model.preprocess import decoded_bytes_estimate

__all__ = ["WorkerPool"]

log = logging.getLogger("enclave")


def _until_closed(source: queue.Queue | queue.SimpleQueue) -> Iterator:
    """The items taken from ``source`` until the None that ``WorkerPool.close`` puts in."""
    while (item := source.get()) is not None:
        yield item


class WorkerPool:
    """``workers`` threads fed by one bounded queue, and ``interpreters`` interpreters, each
    on an inference thread of its own.

    A job goes: the bounded job queue (full: BUSY) -> a worker decodes and preprocesses it,
    under a memory reservation for its decoded pixels -> whichever inference thread is free
    runs its TFLite interpreter on it, on ``inference_threads`` threads (default: the CPUs
    this process may use, shared out between the interpreters) -> the same worker turns the
    output into a prediction and calls ``done`` (seal and send). While an interpreter runs
    one image, the other workers decode the next ones and deliver earlier answers, so it
    never waits for decoding, and a client slow to read its answers holds one worker, not
    an interpreter.

    Why this layout (measured by bench/pipeline.py, bench/worker_memory.py and
    bench/weight_cache.py; docs/PERFORMANCE.md):
    - interpreters are not per worker: each holds ~29 MiB (~19 MiB of activations for the
      four mirror views, the float16 weights expanded and packed as float32), so a worker
      is a thread and one preprocessed image (~1.5 MiB);
    - the enclave runs 2 single-threaded interpreters on 2 CPUs (service.py's
      ``default_interpreters``): in-process 11-17 % more images/s than one on both CPUs,
      which waits for both at every layer; the second costs its ~29 MiB once, whatever
      the worker count. Sharing the packed weights (XNNPACK's weight cache) is only
      offered by LiteRT's CompiledModel, whose run holds the GIL, and would still leave
      ~19 MiB of activations per interpreter;
    - one thread owns each interpreter: workers that took turns on an interpreter under a
      lock were 15-25 % slower in-process than one thread invoking while another decodes
      ahead.
    """

    def __init__(self, model: LesionModel, workers: int, queue_size: int,
                 max_bytes: int, max_pixels: int, budget: MemoryBudget,
                 inference_threads: int | None = None, interpreters: int = 1) -> None:
        """``inference_threads``: threads per interpreter (default: the usable CPUs divided
        among the ``interpreters``, at least 1)."""
        if interpreters < 1:
            raise ValueError("a worker pool needs at least one interpreter")
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._max = (max_bytes, max_pixels)
        self._budget = budget
        self._input_size = model.input_size
        threads = inference_threads or max(1, usable_cpus() // interpreters)
        classifiers = [model.new_classifier(num_threads=threads) for _ in range(interpreters)]
        # Decoding and building the prediction need no interpreter: any one will do.
        self._classifier = classifiers[0]
        # (pixels, where to answer): at most one per worker, so it needs no bound of its own.
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._inference = [threading.Thread(target=self._infer, args=(classifier,),
                                            name=f"inference-{index}", daemon=True)
                           for index, classifier in enumerate(classifiers)]
        for thread in self._inference:
            thread.start()
        self._threads = []
        for index in range(workers):
            thread = threading.Thread(target=self._run, name=f"worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, image: bytes, done: Callable[[Prediction | None, NitroLesionError | None], None]) -> None:
        """Queue one image; ``done(prediction, error)`` runs on a worker. Raises :class:`Busy`."""
        try:
            self._queue.put_nowait((image, done))
        except queue.Full:
            raise Busy("the enclave's queue is full; try again shortly") from None

    def _infer(self, classifier: Classifier) -> None:
        """An inference thread: the only user of ``classifier``'s interpreter."""
        for pixels, answer in _until_closed(self._ready):
            try:
                answer.put(classifier.predict_array(pixels))
            except Exception as exc:  # handed to the worker, which logs it and answers
                answer.put(exc)

    def _run(self) -> None:
        answer: queue.SimpleQueue = queue.SimpleQueue()  # this worker's inference results
        for image, done in _until_closed(self._queue):
            try:
                # The decoded picture lives only inside preprocess: its reservation ends
                # there, before the wait for the interpreter.
                with self._reserve_decode(image):
                    pixels = self._classifier.preprocess(image, max_bytes=self._max[0],
                                                         max_pixels=self._max[1])
                self._ready.put((pixels, answer))
                del pixels
                output = answer.get()
                if isinstance(output, Exception):
                    raise output
                prediction, error = self._classifier.prediction_from(output), None
            except (ImageError, Busy) as exc:
                prediction, error = None, exc
            except Exception:  # a bug must not kill the worker; details stay here
                log.exception("worker failed on a job")
                prediction, error = None, NitroLesionError("internal error while classifying")
            try:
                done(prediction, error)
            except Exception:
                log.exception("result delivery failed")

    def _reserve_decode(self, image: bytes) -> Reservation:
        """Memory for the pixels ``image`` decodes to, from its header, before decoding.

        Raises ImageError when the image is not one we accept or could never fit
        (BAD_IMAGE), Busy when it would fit but the budget is in use right now."""
        need = decoded_bytes_estimate(image, self._input_size, max_bytes=self._max[0],
                                      max_pixels=self._max[1])
        if need > self._budget.limit:
            raise ImageError(f"the image would decode to {need / MIB:.0f} MiB, more than the "
                             f"enclave's {self._budget.limit / MIB:.0f} MiB budget")
        reservation = self._budget.try_reserve(need)
        if reservation is None:
            raise Busy(f"no memory to decode a {need / MIB:.0f} MiB image right now; try again shortly")
        return reservation

    def close(self) -> None:
        """Finish queued jobs, then stop the workers and the inference threads."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        for _ in self._inference:
            self._ready.put(None)
        for thread in self._inference:
            thread.join()
