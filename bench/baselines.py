"""In-process baselines: the fastest this machine classifies images without the enclave.

Each configuration does everything the enclave does for an image except the protocol:
decode + preprocess (``preprocess_image``) and the interpreter, on the same model file,
using every core the way that configuration can:

- ``1 interpreter x 1 thread``: one image after another (the old, single-core baseline);
- ``N interpreters x 1 thread, N threads``: N Python threads, each with its own interpreter;
- ``1 interpreter x N threads``: one image after another, the interpreter on N threads;
- ``1 interpreter x N threads, preprocessing 2 ahead on another thread``: one thread
  decodes while another runs the interpreter;
- ``the enclave's WorkerPool in-process``: nitrolesion/enclave/worker_pool.py itself (workers
  preprocess, the enclave's default interpreters, each on its inference thread), images submitted from this thread: the enclave
  without protocol, sockets or crypto;
- ``batch of B, 1 interpreter x N threads``: B images preprocessed, then one invocation
  with a batch dimension of B (the model's input is (-1, S, S, 3)).

``run_all`` times each on the same images and returns them fastest first, so a benchmark can
compare against the best one and say which it was.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bench.machine import OtherCpu
from nitrolesion.enclave.service import DEFAULT_WORKERS, default_interpreters
from nitrolesion.model.classifier import LesionModel, ModelOutput, Prediction, normalised, usable_cpus
from nitrolesion.model.preprocess import preprocess_image

#: Images classified by each configuration before timing starts: the first invocations
#: allocate and pick kernels.
WARM_UP = 5


@dataclass
class Run:
    """One configuration timed on a list of images."""

    name: str
    seconds: float
    cpu_seconds: float
    latencies_ms: list[float]
    predictions: list[Prediction] = field(repr=False)
    #: Share of the CPUs other processes used meanwhile (bench/machine.py).
    other_cpu: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds


def _timed(name: str, images: list[bytes], classify_all: Callable[[list[bytes]], tuple[list, list]]) -> Run:
    classify_all(images[:WARM_UP])
    with OtherCpu() as other:
        started, cpu = time.perf_counter(), time.process_time()
        predictions, latencies = classify_all(images)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Run(name, seconds, cpu, latencies, predictions, other.share)


def sequential(model: LesionModel, threads: int) -> Callable:
    """One interpreter on ``threads`` threads, one image after another."""
    classifier = model.new_classifier(num_threads=threads)

    def classify_all(images):
        predictions, latencies = [], []
        for image in images:
            begin = time.perf_counter()
            predictions.append(classifier.classify(image))
            latencies.append((time.perf_counter() - begin) * 1000)
        return predictions, latencies
    return classify_all


def _in_threads(count: int, images: list[bytes], one: Callable[[int, bytes], Prediction]):
    """``one(thread_number, image)`` for every image, spread over ``count`` threads that take
    the next image as they come free; (predictions in image order, latencies)."""
    predictions: list = [None] * len(images)
    latencies: list = [0.0] * len(images)
    indices = iter(range(len(images)))
    take = threading.Lock()

    def loop(number: int) -> None:
        while True:
            with take:
                index = next(indices, None)
            if index is None:
                return
            begin = time.perf_counter()
            predictions[index] = one(number, images[index])
            latencies[index] = (time.perf_counter() - begin) * 1000

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return predictions, latencies


def interpreter_per_thread(model: LesionModel, count: int) -> Callable:
    """``count`` threads, each with its own one-thread interpreter."""
    classifiers = [model.new_classifier(num_threads=1) for _ in range(count)]
    return lambda images: _in_threads(count, images, lambda n, image: classifiers[n].classify(image))


def preprocessing_ahead(model: LesionModel, threads: int, ahead: int = 2) -> Callable:
    """One thread preprocesses up to ``ahead`` images ahead of another that runs one
    interpreter on ``threads`` threads."""
    classifier = model.new_classifier(num_threads=threads)

    def classify_all(images):
        ready: queue.Queue = queue.Queue(maxsize=ahead)
        started = [0.0] * len(images)

        def feed() -> None:
            for index, image in enumerate(images):
                started[index] = time.perf_counter()
                ready.put(classifier.preprocess(image))
            ready.put(None)

        feeder = threading.Thread(target=feed)
        feeder.start()
        predictions, latencies = [], []
        while (pixels := ready.get()) is not None:
            predictions.append(classifier.prediction_from(classifier.predict_array(pixels)))
            latencies.append((time.perf_counter() - started[len(latencies)]) * 1000)
        feeder.join()
        return predictions, latencies
    return classify_all


def worker_pool(model: LesionModel, workers: int) -> Callable:
    """The enclave's own WorkerPool (nitrolesion/enclave/worker_pool.py) in this process: no protocol, no
    sockets, no crypto; as many images in flight as its queue holds."""
    from nitrolesion.enclave.worker_pool import WorkerPool
    from nitrolesion.memory_budget import MemoryBudget
    from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

    queue_size = 16
    pool = WorkerPool(model, workers, queue_size, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS,
                      MemoryBudget(1 << 34), interpreters=default_interpreters())

    def classify_all(images):
        predictions: list = [None] * len(images)
        latencies: list = [0.0] * len(images)
        room = threading.Semaphore(queue_size)  # never more than the queue holds: no BUSY
        finished = threading.Semaphore(0)
        for index, image in enumerate(images):
            room.acquire()
            begin = time.perf_counter()

            def done(prediction, error, index=index, begin=begin):
                predictions[index] = prediction if error is None else error
                latencies[index] = (time.perf_counter() - begin) * 1000
                room.release()
                finished.release()
            pool.submit(image, done)
        for _ in images:
            finished.acquire()
        failed = [p for p in predictions if isinstance(p, Exception)]
        if failed:
            raise RuntimeError(f"the worker pool failed on {len(failed)} images: {failed[0]}")
        return predictions, latencies
    return classify_all


def batched(model: LesionModel, threads: int, batch: int) -> Callable:
    """Preprocess ``batch`` images, then one invocation over all of them (the last batch
    padded with zeros); every image's latency is its batch's."""
    interpreter = model._interpreter_class(model_content=model.model_bytes, num_threads=threads)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [batch, model.input_size, model.input_size, 3])
    interpreter.allocate_tensors()
    output_index = interpreter.get_output_details()[0]["index"]
    features_index = interpreter.get_output_details()[1]["index"]
    labeller = model.new_classifier()  # only for prediction_from (labels, triage)

    def classify_all(images):
        predictions, latencies = [], []
        block = np.zeros((batch, model.input_size, model.input_size, 3), np.float32)
        for start in range(0, len(images), batch):
            begin = time.perf_counter()
            chunk = images[start:start + batch]
            block[:] = 0
            for row, image in enumerate(chunk):
                block[row] = preprocess_image(image, model.input_size)
            interpreter.set_tensor(inp["index"], block)
            interpreter.invoke()
            output = interpreter.get_tensor(output_index)
            # The graph stacks the four mirror views view-major: rows v * batch + image.
            features = interpreter.get_tensor(features_index).reshape(4, batch, -1)
            predictions += [labeller.prediction_from(ModelOutput(normalised(output[row]),
                                                                 features[:, row]))
                            for row in range(len(chunk))]
            latencies += [(time.perf_counter() - begin) * 1000] * len(chunk)
        return predictions, latencies
    return classify_all


def configurations(model: LesionModel, cpus: int | None = None,
                   pool_workers: int = DEFAULT_WORKERS) -> list[tuple[str, Callable]]:
    """(name, classify_all) for every configuration, built once (interpreters allocated);
    the WorkerPool with the enclave's default worker count unless ``pool_workers`` says."""
    n = cpus or usable_cpus()
    configs = [("1 interpreter x 1 thread", sequential(model, 1))]
    if n > 1:
        configs += [
            (f"{n} interpreters x 1 thread, {n} threads", interpreter_per_thread(model, n)),
            (f"1 interpreter x {n} threads", sequential(model, n)),
            (f"1 interpreter x {n} threads, preprocessing 2 ahead on another thread",
             preprocessing_ahead(model, n)),
            (f"the enclave's WorkerPool in-process ({pool_workers} workers, "
             f"{default_interpreters()} interpreters)",
             worker_pool(model, pool_workers)),
        ]
    configs += [(f"batch of {b}, 1 interpreter x {n} threads", batched(model, n, b)) for b in (2, 4)]
    return configs


def run_all(configs: list[tuple[str, Callable]], images: list[bytes]) -> list[Run]:
    """Time every configuration on ``images``; fastest first."""
    runs = [_timed(name, images, classify_all) for name, classify_all in configs]
    return sorted(runs, key=lambda run: -run.images_per_second)


def largest_difference(a: list[Prediction], b: list[Prediction]) -> float:
    """Largest difference of any probability between two lists of predictions."""
    return max((abs(x.probabilities[c] - y.probabilities[c])
                for x, y in zip(a, b, strict=True) for c in x.probabilities), default=0.0)
