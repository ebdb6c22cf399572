"""Operator actions, each written once: the JSON API, the dashboard and the CLI call these.

A surface parses its input, calls one function here and renders what it returns
(or the ``kana.errors.KanaError`` it raises). Each action opens its own unit of
work, commits, and only then enqueues the job that follows it, so a worker never
looks for a row that is not there yet.

Redis being down is treated one way everywhere:

* when the job *is* the action (start an import, refresh flags, queue a
  reprocessing, requeue a dead letter) nothing is left half done and
  ``errors.Unavailable`` is raised (API 503, a dashboard error notice, CLI exit 75);
* when the action is a committed change and the job only follows from it
  (reprocessing after a feature or rule is saved), the change stays and the
  result says the job was not queued (``job_id`` None, ``reprocess_error``): a
  client retrying an error would save it twice.
"""
