"""The scheduler process: RQ's cron scheduler running ``config/cron.py``, riding out Redis outages.

``python -m kana.scheduler`` (the Procfile's ``scheduler``). ``rq cron`` itself
exits on the first Redis error; this loop uses rq's ``CronScheduler`` for the
schedule and its registry, and when Redis goes away it logs once, retries
with backoff, registers again on its return and runs what fell due meanwhile.
"""

from __future__ import annotations

import logging
import signal
import threading

from redis.exceptions import RedisError
from rq.cron import CronScheduler

import config
from config import Settings
from kana import outages
from kana.runtime import Runtime

SCHEDULE = "config.cron"
log = logging.getLogger("kana.scheduler")


def run(settings: Settings, stop: threading.Event, schedule: str = SCHEDULE) -> None:
    """Enqueue the scheduled jobs when due until ``stop`` is set."""
    runtime = Runtime(settings)
    scheduler = CronScheduler(connection=runtime.redis, logging_level=settings.log_level)
    scheduler.load_config_from_file(schedule)
    redis = outages.Outage("redis", log)
    while outages.wait_until_up(lambda: outages.redis_problem(runtime.redis), redis, stop.is_set, sleep=stop.wait):
        try:
            scheduler.register_birth()
            while not stop.is_set():
                # A job whose enqueue failed keeps its due time: it runs on Redis's return.
                if scheduler.enqueue_jobs():
                    scheduler.save()
                scheduler.heartbeat()
                stop.wait(scheduler.calculate_sleep_interval())
        except (RedisError, OSError) as exc:
            redis.down(exc)
        if stop.is_set():
            break
    try:
        scheduler.register_death()
    except (RedisError, OSError):
        pass  # its registry entry expires by itself


def main() -> None:
    settings = config.load()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run(settings, stop)


if __name__ == "__main__":
    main()
