"""The enclave's WorkerPool in-process: its interpreters whatever the worker count, answers
equal to the in-process classifier's, and per-job failures that leave the pool serving.

The pool is driven directly (no sockets, no protocol); test_service_concurrency.py covers
it behind real connections.
"""

from __future__ import annotations

import threading

import pytest

from nitrolesion.enclave.worker_pool import WorkerPool
from nitrolesion.errors import Busy
from nitrolesion.errors import ImageError, NitroLesionError
from nitrolesion.memory_budget import MemoryBudget
from nitrolesion.model.classifier import Classifier, LesionModel, usable_cpus
from nitrolesion.model.labels import CODES
from nitrolesion.model.preprocess import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

#: Results must match the in-process classifier this closely (same code, same model).
TOLERANCE = 1e-6
#: Seconds to wait for any one answer: generous, so a loaded machine is slow, not flaky.
ANSWER_TIMEOUT = 60.0
BUDGET = 256 * 1024 * 1024


@pytest.fixture(scope="module")
def model(model_present):
    return LesionModel()


@pytest.fixture(scope="module")
def reference(model):
    return model.new_classifier()


def new_pool(model, workers=2, queue_size=16, budget=None, **kwargs) -> WorkerPool:
    return WorkerPool(model, workers, queue_size, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS,
                      budget or MemoryBudget(BUDGET), **kwargs)


class Answers:
    """Collects ``done(prediction, error)`` calls by job number."""

    def __init__(self) -> None:
        self.got: dict[int, tuple] = {}
        self._changed = threading.Condition()

    def done_for(self, number: int):
        def done(prediction, error):
            with self._changed:
                self.got[number] = (prediction, error)
                self._changed.notify_all()
        return done

    def wait(self, count: int) -> dict[int, tuple]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.got) >= count, timeout=ANSWER_TIMEOUT), \
                f"{len(self.got)} of {count} answers"
        return self.got


def same(prediction, expected) -> bool:
    return prediction.code == expected.code and all(
        abs(prediction.probabilities[c] - expected.probabilities[c]) <= TOLERANCE for c in CODES)


@pytest.mark.parametrize("options, expected", [
    ({"workers": 4}, lambda cpus: [cpus]),  # one interpreter on every CPU
    ({"workers": 3, "inference_threads": 1}, lambda cpus: [1]),
    ({"workers": 3, "interpreters": 2}, lambda cpus: [max(1, cpus // 2)] * 2),  # CPUs shared out
])
def test_interpreters_whatever_the_worker_count(model, monkeypatch, options, expected):
    # Each interpreter holds ~29 MiB (bench/worker_memory.py), so workers must not each
    # make one: the pool makes exactly ``interpreters`` (default 1), each on its own thread.
    made = []
    original = LesionModel.new_classifier

    def counting(self, num_threads=1):
        made.append(num_threads)
        return original(self, num_threads)

    monkeypatch.setattr(LesionModel, "new_classifier", counting)
    pool = new_pool(model, **options)
    try:
        assert made == expected(usable_cpus())
        assert len(pool._inference) == len(made)
    finally:
        pool.close()


def test_a_pool_without_interpreters_is_refused(model):
    with pytest.raises(ValueError, match="at least one interpreter"):
        new_pool(model, interpreters=0)


@pytest.mark.parametrize("interpreters", [1, 2])
def test_answers_equal_the_in_process_classifier(model, reference, many_image_paths, interpreters):
    images = [path.read_bytes() for path in many_image_paths[:40]]
    expected = [reference.classify(image) for image in images]
    pool = new_pool(model, workers=3, queue_size=len(images), interpreters=interpreters)
    answers = Answers()
    try:
        submitters = [threading.Thread(target=lambda part=part: [
            pool.submit(images[i], answers.done_for(i)) for i in part])
            for part in (range(0, 40, 2), range(1, 40, 2))]  # two submitting threads at once
        for thread in submitters:
            thread.start()
        for thread in submitters:
            thread.join()
        got = answers.wait(len(images))
    finally:
        pool.close()
    assert all(got[i][1] is None for i in range(len(images))), [got[i][1] for i in got if got[i][1]]
    assert all(same(got[i][0], expected[i]) for i in range(len(images)))


def test_bad_image_is_an_image_error_and_the_pool_goes_on(model, reference, test_image_paths):
    good = test_image_paths[0].read_bytes()
    budget = MemoryBudget(BUDGET)
    pool = new_pool(model, workers=2, budget=budget)
    answers = Answers()
    try:
        pool.submit(b"not an image", answers.done_for(0))
        pool.submit(good[: len(good) // 3], answers.done_for(1))  # truncated JPEG
        pool.submit(good, answers.done_for(2))
        got = answers.wait(3)
    finally:
        pool.close()
    assert got[0][0] is None and isinstance(got[0][1], ImageError)
    assert got[1][0] is None and isinstance(got[1][1], ImageError)
    assert got[2][1] is None and same(got[2][0], reference.classify(good))
    # Every decode reservation was given back, and one was taken for the good image.
    assert budget.used == 0 and budget.peak > 0


def test_full_queue_is_busy_at_once(model, test_image_paths):
    image = test_image_paths[0].read_bytes()
    pool = new_pool(model, workers=1, queue_size=1)
    release, delivering = threading.Event(), threading.Event()
    answers = Answers()

    def held(prediction, error):  # the only worker is stuck delivering this answer
        delivering.set()
        release.wait(ANSWER_TIMEOUT)
        answers.done_for(0)(prediction, error)

    try:
        pool.submit(image, held)
        assert delivering.wait(ANSWER_TIMEOUT)
        pool.submit(image, answers.done_for(1))  # waits in the one queue slot
        with pytest.raises(Busy, match="queue is full"):
            pool.submit(image, answers.done_for(2))
        release.set()
        got = answers.wait(2)
    finally:
        release.set()
        pool.close()
    assert got[0][1] is None and got[1][1] is None and 2 not in got


def answer_with_budget(model, image: bytes, budget: MemoryBudget):
    """The one answer a one-worker pool on ``budget`` gives for ``image``."""
    pool = new_pool(model, workers=1, budget=budget)
    answers = Answers()
    try:
        pool.submit(image, answers.done_for(0))
        return answers.wait(1)[0]
    finally:
        pool.close()


def test_no_memory_to_decode_is_busy_and_never_fitting_is_bad_image(model, test_image_paths):
    image = test_image_paths[0].read_bytes()
    tiny = MemoryBudget(1024)  # less than any image decodes to
    got = answer_with_budget(model, image, tiny)
    assert got[0] is None and isinstance(got[1], ImageError)
    assert "budget" in str(got[1]) and tiny.used == 0

    budget = MemoryBudget(BUDGET)
    held = budget.try_reserve(BUDGET - 1024)  # someone else holds nearly all of it
    try:
        got = answer_with_budget(model, image, budget)
    finally:
        held.release()
    assert got[0] is None and isinstance(got[1], Busy)


def test_interpreter_failure_is_an_internal_error_for_that_job_only(model, reference,
                                                                     test_image_paths, monkeypatch):
    image = test_image_paths[0].read_bytes()
    pool = new_pool(model, workers=2)
    original = Classifier.predict_array
    calls = []

    def fails_once(self, pixels):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("interpreter exploded")
        return original(self, pixels)

    monkeypatch.setattr(Classifier, "predict_array", fails_once)
    answers = Answers()
    try:
        pool.submit(image, answers.done_for(0))
        answers.wait(1)
        pool.submit(image, answers.done_for(1))
        got = answers.wait(2)
    finally:
        pool.close()
    assert got[0][0] is None and type(got[0][1]) is NitroLesionError
    assert "internal error" in str(got[0][1]) and "exploded" not in str(got[0][1])
    assert got[1][1] is None and same(got[1][0], reference.classify(image))


@pytest.mark.parametrize("interpreters", [1, 2])
def test_close_answers_every_queued_job_then_stops_every_thread(model, test_image_paths,
                                                                interpreters):
    images = [path.read_bytes() for path in test_image_paths]
    pool = new_pool(model, workers=2, queue_size=len(images), interpreters=interpreters)
    answers = Answers()
    for number, image in enumerate(images):
        pool.submit(image, answers.done_for(number))
    pool.close()  # returns only once queued jobs are answered
    assert sorted(answers.got) == list(range(len(images)))
    assert all(error is None for _, error in answers.got.values())
    assert not any(thread.is_alive() for thread in [*pool._threads, *pool._inference])


@pytest.mark.parametrize("cpus, expected", [(1, 1), (2, 2), (8, 2)])
def test_the_enclave_runs_one_interpreter_per_cpu_at_most_two(monkeypatch, cpus, expected):
    # A second interpreter costs ~29 MiB: worth it on 2+ CPUs (docs/PERFORMANCE.md), not on 1.
    from nitrolesion.enclave import service
    monkeypatch.setattr(service, "usable_cpus", lambda: cpus)
    assert service.default_interpreters() == expected
    assert service.ServiceConfig("tcp", "127.0.0.1", 3, 1, 2).interpreters == expected
