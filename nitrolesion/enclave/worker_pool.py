"""The enclave's worker pool: a bounded job queue, decoding workers, one shared interpreter.

Nothing here logs an image or a label: log lines name failures by kind only.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator

from nitrolesion.errors import Busy, ImageError, NitroLesionError
from nitrolesion.memory_budget import MIB, MemoryBudget, Reservation
from nitrolesion.model.classifier import LesionModel, Prediction, usable_cpus
from nitrolesion.model.preprocess import decoded_bytes_estimate

__all__ = ["WorkerPool"]

log = logging.getLogger("enclave")


def _until_closed(source: queue.Queue | queue.SimpleQueue) -> Iterator:
    """The items taken from ``source`` until the None that ``WorkerPool.close`` puts in."""
    while (item := source.get()) is not None:
        yield item


class WorkerPool:
    """``workers`` threads fed by one bounded queue, and one interpreter on its own thread.

    A job goes: the bounded job queue (full: BUSY) -> a worker decodes and preprocesses it,
    under a memory reservation for its decoded pixels -> the inference thread runs the
    pool's one TFLite interpreter on it, on ``inference_threads`` threads (default: every CPU
    this process may use) -> the same worker turns the output into a prediction and calls
    ``done`` (seal and send). While the interpreter runs one image, the other workers
    decode the next ones and deliver earlier answers, so it never waits for decoding, and a
    client slow to read its answers holds one worker, not the interpreter.

    Why this layout (measured by bench/pipeline.py and bench/worker_memory.py):
    - one interpreter: each holds ~29 MiB (its activation arena for the four mirror views,
      the float16 weights expanded to float32), so one per worker made every worker beyond
      the first cost ~31 MiB; a worker is now a thread and one preprocessed image (~2.5 MiB);
    - one thread owns it: workers that took turns on the interpreter under a lock were
      15-25 % slower in-process than one thread invoking while another decodes ahead.
    """

    def __init__(self, model: LesionModel, workers: int, queue_size: int,
                 max_bytes: int, max_pixels: int, budget: MemoryBudget,
                 inference_threads: int | None = None) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._max = (max_bytes, max_pixels)
        self._budget = budget
        self._input_size = model.input_size
        self._classifier = model.new_classifier(num_threads=inference_threads or usable_cpus())
        # (pixels, where to answer): at most one per worker, so it needs no bound of its own.
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._inference = threading.Thread(target=self._infer, name="inference", daemon=True)
        self._inference.start()
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

    def _infer(self) -> None:
        """The inference thread: the only user of the interpreter."""
        for pixels, answer in _until_closed(self._ready):
            try:
                answer.put(self._classifier.predict_array(pixels))
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
        """Finish queued jobs, then stop the workers and the inference thread."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._ready.put(None)
        self._inference.join()
