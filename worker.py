"""The worker process: an RQ worker on the Kana queue, with the same settings as the web.

It rides out outages: RQ's worker quits on most Redis errors (and logs every
reconnection attempt of its dequeue loop); here the loop waits for Redis with
backoff and starts the worker again, logging one line when Redis goes and one
when it is back. A database outage is waited out inside the drain job
(``jobs.events``). A thread looks for partitions whose drain died (another
worker SIGKILLed, a lost host) every ``takeover_interval`` seconds and wakes them.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from redis import ConnectionPool, Redis
from redis.exceptions import RedisError
from rq import SimpleWorker, Worker

import config
import jobs
from kana import broker, outages
from kana.runtime import Runtime

log = logging.getLogger("kana.worker")
REDIS = outages.Outage("redis", log)
STOP = threading.Event()

_RQ_RECONNECT = ("could not connect to Redis", "Redis connection timeout")


class _QuietReconnects(logging.Filter):
    """Turns rq's per-attempt connection errors into the one outage line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        exc = record.exc_info[1] if record.exc_info else next((a for a in args if isinstance(a, Exception)), None)
        if isinstance(exc, RedisError | OSError) or any(text in str(record.msg) for text in _RQ_RECONNECT):
            REDIS.down(exc or record.getMessage())
            return False
        return True


class _RidesOutages:
    # rq's own dequeue retry doubles its pause up to a minute; keep it short so
    # work resumes within seconds of Redis's return.
    max_connection_wait_time = outages.MAX_BACKOFF

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:  # noqa: ANN001 - rq's signature
        super().heartbeat(timeout, pipeline)  # type: ignore[misc]
        if pipeline is None:
            REDIS.up()

    def request_stop(self, signum, frame) -> None:  # noqa: ANN001 - a signal handler
        STOP.set()
        super().request_stop(signum, frame)  # type: ignore[misc]


class KanaWorker(_RidesOutages, SimpleWorker):
    pass


class ForkingKanaWorker(_RidesOutages, Worker):
    pass


def _close(worker: Worker) -> None:
    # rq's teardown unsubscribes after registering the death in Redis; when that
    # failed, stop the pubsub thread here so restarts don't pile them up.
    thread = getattr(worker, "pubsub_thread", None)
    if thread is not None and thread.is_alive():
        thread.stop()
        thread.join(timeout=1)


def _rq_connection(redis: Redis) -> Redis:
    """A client of its own for rq, which raises its socket timeout above its ~7 minute blocking dequeue.

    The drains and their lock heartbeat keep ``broker``'s 5 s timeout, so a
    Redis that hangs rather than refuses fails their commands quickly.
    """
    pool = redis.connection_pool
    return Redis(connection_pool=ConnectionPool(connection_class=pool.connection_class, **pool.connection_kwargs))


def _take_over(runtime: Runtime) -> None:
    suspects: set[int] = set()
    while not STOP.wait(runtime.settings.takeover_interval):
        try:
            woken, suspects = broker.take_over(runtime.redis, runtime.settings, suspects)
        except (RedisError, OSError):
            continue  # the main loop reports the outage
        if woken:
            log.info("took over partitions %s (their drain died)", woken)


def _stop_on_signal(signum: int, frame: object) -> None:
    STOP.set()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    settings = config.load()
    runtime = jobs.init(settings)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("rq.worker").addFilter(_QuietReconnects())
    burst = "--burst" in args
    # SimpleWorker runs jobs in this process: the engine's connection pool and
    # the Redis connection survive across jobs (a forking worker pays for both
    # on every job). Drain jobs are long and few, so isolation by fork buys little.
    worker_class = ForkingKanaWorker if "--fork" in args else KanaWorker
    if not burst:
        threading.Thread(target=_take_over, args=(runtime,), name="takeover", daemon=True).start()
    connection = _rq_connection(runtime.redis)
    while True:
        signal.signal(signal.SIGINT, _stop_on_signal)
        signal.signal(signal.SIGTERM, _stop_on_signal)
        if not outages.wait_until_up(lambda: outages.redis_problem(connection), REDIS, STOP.is_set,
                                     sleep=STOP.wait):
            break
        worker = worker_class([settings.queue_name], connection=connection)
        try:
            worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level)
        except (RedisError, OSError) as exc:  # registering birth or death talks to Redis too
            REDIS.down(exc)
        finally:
            _close(worker)
        if burst or STOP.is_set():
            break
        STOP.wait(1.0)  # it quit on an error: start again, but not in a tight loop
    STOP.set()


if __name__ == "__main__":
    main()
