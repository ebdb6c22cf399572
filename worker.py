"""The worker process: an RQ worker on the Kana queue, with the same settings as the web."""

from __future__ import annotations

import logging
import sys

from rq import SimpleWorker, Worker

import config
import jobs


def main(argv: list[str] | None = None) -> None:
    settings = config.load()
    runtime = jobs.init(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # SimpleWorker runs jobs in this process: the engine's connection pool and
    # the Redis connection survive across jobs (a forking worker pays for both
    # on every job). Drain jobs are long and few, so isolation by fork buys little.
    worker_class = Worker if "--fork" in (argv or sys.argv[1:]) else SimpleWorker
    worker = worker_class([runtime.queue], connection=runtime.redis)
    worker.work(burst="--burst" in (argv or sys.argv[1:]), with_scheduler=False)


if __name__ == "__main__":
    main()
