"""The schedule, run by ``python -m kana.scheduler`` (the Procfile's scheduler); ``rq cron`` reads it too."""

from rq import cron

import config
from jobs import flags, maintenance

settings = config.load()

# Partitions left with events but no live drain (a killed worker) are re-woken.
cron.register(maintenance.recover, settings.queue_name, interval=settings.recover_interval, name="recover")
# Flag tables (users without a billing id, shared emails) rebuilt for every workspace (SPEC §6).
cron.register(flags.refresh_all, settings.queue_name, interval=settings.flags_interval, name="flags-refresh",
              job_timeout=3600)
