"""Runner processes: one per loaded GGUF model, supervised by the daemon.

A llama.cpp segfault, abort or OOM kill ends the runner and the requests it held, not the
daemon. The pieces:

* :mod:`infernod.runner.wire` - the small internal protocol (msgpack over one ZeroMQ
  DEALER/ROUTER pair on ipc:// in the daemon's private runtime directory).
* :mod:`infernod.runner.main` - the runner process (``python -m infernod.runner``): a real
  :class:`~infernod.backends.gguf.GgufEngine` whose events go back in batches, at most one
  message per decode step.
* :mod:`infernod.runner.supervisor` - the daemon side: spawns runners from the event-loop
  thread, notices their death within a second (pidfd), and :class:`RunnerEngine`, a proxy
  with the engine surface the generation service uses, delivering events on the loop.

See docs/architecture.md ("Runner processes").
"""
