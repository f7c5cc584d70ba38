"""The dynamic batcher: a bounded queue of single-latent jobs and one worker thread per engine.

Triton's semantics: a worker takes the oldest job, then waits up to `max_delay_s` (counted from that job's
arrival) for more jobs that can share its batch — same latent shape, steps and text shape — and runs as soon
as `max_batch` of them are there or the delay is over. Jobs of other shapes wait their turn in arrival order.

    event loop                               worker thread (one per engine/device)
    submit(jobs) -> 429 when full  ──queue──> next batch -> drop cancelled / expired jobs -> engine.decode
    await job.future (deadline)    <─futures─ set_result per job; a failed batch is retried latent by latent,
                                              so only a latent that fails alone gets set_exception

Nothing here runs on the event loop except `submit`, which only appends under a lock.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pidserve.engines import DecodeAbandoned, DecodeBatch, Engine
from pidserve.model import Tiling

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue cannot take these jobs; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the decode queue is full ({depth} latents waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The job's deadline passed before it could run."""


class EngineFailure(Exception):
    """The engine raised while decoding this job's batch (other batches are unaffected)."""


class ShuttingDown(Exception):
    """The service stops accepting work, or its shutdown deadline came before this job finished."""


@dataclass(eq=False)
class Job:
    """One latent to decode. `future` resolves to a JobResult, or to one of the exceptions above."""

    latent: torch.Tensor  # float32 [C, h, w]
    sigma: float
    seed: int
    text: torch.Tensor | None  # float32 [Lt, text_dim] or None
    steps: int
    deadline: float  # time.monotonic() by which the job must have started
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.monotonic)
    # Why the future was cancelled, for the dropped-jobs metric: the service sets "deadline" or
    # "client_closed" before it cancels; anything else that cancels counts as "cancelled".
    drop_reason: str = "cancelled"
    # Set by the service when nobody waits for the result any more (its deadline passed or its client
    # left) while the job may already be computing: a batch whose jobs are all abandoned stops between
    # sampler steps where the engine can (engines/base.py, DecodeBatch.abandoned).
    abandoned: bool = False
    tiling: Tiling | None = None  # the request's; None: the engine's default

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        text_shape = None if self.text is None else tuple(self.text.shape)
        return (tuple(self.latent.shape), self.steps, text_shape, self.tiling)


@dataclass
class JobResult:
    image: torch.Tensor  # uint8 [H, W, 3]
    queue_s: float  # enqueue -> batch start
    compute_s: float  # the batch's engine time
    batch_size: int
    windows: int = 1  # windows per image of a tiled decode


@dataclass
class BatchStats:
    """What a worker reports per batch (metrics hook)."""

    size: int
    compute_s: float
    failed: bool


class Batcher:
    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.engines = list(engines)
        self.max_batch = min([max_batch, *(e.capabilities.max_batch for e in engines)])
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda stats: None)
        self.on_drop = on_drop or (lambda reason: None)
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._busy = 0
        self._running: set[Job] = set()  # jobs inside engine.decode now (the shutdown cut-off fails them)
        self._mean_batch_s = 0.0
        self._threads = [
            threading.Thread(target=self._work, args=(engine,), name=f"decode-worker-{i}", daemon=True)
            for i, engine in enumerate(self.engines)
        ]

    # ---- event-loop side ----
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of `jobs` or none of them (QueueFull, or ShuttingDown once `stop` began)."""
        with self._cond:
            if not self._accepting:
                raise ShuttingDown("the service is shutting down; retry on another replica")
            if len(self._jobs) + len(jobs) > self.max_queue:
                raise QueueFull(len(self._jobs), self._retry_after())
            self._jobs.extend(jobs)
            self._cond.notify_all()

    def withdraw(self, jobs: Sequence[Job]) -> None:
        """Take back jobs nobody waits for (deadline, client gone) that are still queued, so they stop
        holding queue slots at once; each counts as dropped for its `drop_reason`. Jobs already
        running are left to the worker (and stop between steps where the engine can)."""
        wanted = {id(job) for job in jobs}
        with self._cond:
            taken = [job for job in self._jobs if id(job) in wanted]
            if taken:
                self._jobs = [job for job in self._jobs if id(job) not in wanted]
                self._cond.notify_all()
        for job in taken:
            if job.future.cancel():
                self.on_drop(job.drop_reason)

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch per engine (at least 1)."""
        batches = len(self._jobs) / max(1, self.max_batch * len(self.engines))
        return max(1, round(batches * self._mean_batch_s + 0.5))

    def stop(self, deadline: float) -> bool:
        """Stop accepting; let the workers run the queue until `deadline` (a time.monotonic()); then fail
        every job not finished with ShuttingDown — queued ones before compute, running ones at once (their
        clients get a 503 inside the grace period; an eager engine stops at its next sampler step) — and
        stop the workers. Returns True when everything finished in time."""
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            while (self._jobs or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            finished = not self._jobs and not self._busy
            left, self._jobs = self._jobs, []
            running = list(self._running)
            self._stopping = True
            self._cond.notify_all()
        cut_off = ShuttingDown("the service shut down before this latent finished; retry on another replica")
        for job in left:
            if job.future.set_running_or_notify_cancel():
                self.on_drop("shutdown")
                _settle(job, error=cut_off)
        for job in running:
            job.drop_reason, job.abandoned = "shutdown", True
            _settle(job, error=cut_off)
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        return finished

    # ---- worker side ----
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._jobs[0]
            flush_at = first.enqueued + self.max_delay_s
            while True:
                group = [job for job in self._jobs if job.key == first.key][: self.max_batch]
                wait = flush_at - time.monotonic()
                if len(group) >= self.max_batch or wait <= 0 or not self._accepting:
                    break
                self._cond.wait(timeout=wait)
            taken = set(map(id, group))
            self._jobs = [job for job in self._jobs if id(job) not in taken]
            self._busy += 1
            return group

    def _work(self, engine: Engine) -> None:
        while (group := self._next_batch()) is not None:
            try:
                self._run(engine, group)
            except Exception:  # a bug here must not kill the worker: fail the group, keep serving
                log.exception("decode worker failed outside the engine")
                for job in group:
                    if job.future.running():
                        _settle(job, error=EngineFailure("internal error in the decode worker"))
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _run(self, engine: Engine, group: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in group:
            if not job.future.set_running_or_notify_cancel():
                self.on_drop(job.drop_reason)  # the client went away or its deadline passed while queued
            elif job.deadline < now:
                _settle(job, error=DeadlineExceeded("the request's deadline passed while it was queued"))
                self.on_drop("deadline")
            else:
                live.append(job)
        if not live:
            return
        with self._cond:
            self._running.update(live)
        try:
            self._decode_isolating_failures(engine, live)
        finally:
            with self._cond:
                self._running.difference_update(live)

    def _decode_isolating_failures(self, engine: Engine, live: list[Job]) -> None:
        try:
            self._decode(engine, live)
        except DecodeAbandoned:
            self._abandon(live)
        except Exception as exc:
            if len(live) == 1:
                _settle(live[0], error=EngineFailure(f"the engine failed on this latent: {exc}"))
                return
            # One bad latent must not fail its batch-mates (other clients' requests): decode each alone,
            # so only the jobs that fail by themselves fail.
            for job in live:
                try:
                    self._decode(engine, [job])
                except DecodeAbandoned:
                    self._abandon([job])
                except Exception as alone:
                    _settle(job, error=EngineFailure(f"the engine failed on this latent: {alone}"))

    def _abandon(self, jobs: list[Job]) -> None:
        """The engine stopped part-way: nobody waits for these jobs (the service already answered)."""
        for job in jobs:
            self.on_drop(job.drop_reason)
            _settle(job, error=DeadlineExceeded("abandoned during compute"))

    def _decode(self, engine: Engine, jobs: list[Job]) -> None:
        """Decode `jobs` as one batch and resolve their futures; raises (futures untouched) on failure."""
        start = time.monotonic()
        try:
            batch = DecodeBatch(
                latents=torch.stack([job.latent for job in jobs]),
                sigmas=torch.tensor([job.sigma for job in jobs], dtype=torch.float32),
                seeds=torch.tensor([job.seed for job in jobs], dtype=torch.int64),
                text=None if jobs[0].text is None else torch.stack([job.text for job in jobs]),
                steps=jobs[0].steps,
                abandoned=lambda: all(job.abandoned for job in jobs),
                tiling=jobs[0].tiling,
            )
            result = engine.decode(batch)
        except DecodeAbandoned:
            raise
        except Exception:
            log.exception("engine %s failed on a batch of %d", engine.backend, len(jobs))
            self.on_batch(BatchStats(len(jobs), time.monotonic() - start, failed=True))
            raise
        compute_s = time.monotonic() - start
        self._mean_batch_s = (
            compute_s if not self._mean_batch_s else 0.8 * self._mean_batch_s + 0.2 * compute_s
        )
        self.on_batch(BatchStats(len(jobs), compute_s, failed=False))
        for job, image in zip(jobs, result.images, strict=True):
            _settle(job, result=JobResult(image, start - job.enqueued, compute_s, len(jobs), result.windows))


def _settle(job: Job, result: JobResult | None = None, error: Exception | None = None) -> None:
    """Resolve a running job's future, unless the shutdown cut-off already did (from another thread)."""
    try:
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
