"""The schedule, run by ``python -m kana.scheduler`` (the Procfile's scheduler); ``rq cron`` reads it too."""

from rq import cron

import config
from jobs import flags, maintenance, webhooks

settings = config.load()

# Partitions left with events but no live drain (a killed worker) are re-woken.
cron.register(maintenance.recover, settings.queue_name, interval=settings.recover_interval, name="recover")
# Flag tables (users without a billing id, shared emails) rebuilt for every workspace (SPEC §6).
cron.register(flags.refresh_all, settings.queue_name, interval=settings.flags_interval, name="flags-refresh",
              job_timeout=3600)
# Webhook deliveries due for a retry (backoff) or left by a killed worker (SPEC §11).
cron.register(webhooks.sweep, settings.queue_name, interval=settings.webhook_sweep_interval, name="webhooks-sweep")
