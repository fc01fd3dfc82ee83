"""The wire's vocabulary, declared once: the daemon validates against these names, builds
bodies with them, and the CLI and the console offer them. (Error codes: errors.CODES.)"""

from __future__ import annotations

# Priority classes, highest first: a request's `priority`, a queue row's `class`.
PRIORITIES: tuple[str, ...] = ("vip", "high", "normal", "low")

# Sampling parameters a generate/jobs.submit body may carry that go to the sampler as they
# are; with max_tokens, stop and ignore_eos they make GENERATION_PARAMS.
SAMPLING_KEYS: tuple[str, ...] = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty",
                                  "frequency_penalty", "presence_penalty", "repeat_last_n",
                                  "seed")
GENERATION_PARAMS: tuple[str, ...] = ("max_tokens", *SAMPLING_KEYS, "stop", "ignore_eos")

# What a queued or running request is, and where it stands (a queue row's `kind`, `state`).
REQUEST_KINDS: tuple[str, ...] = ("generate", "embed", "infer")
QUEUE_STATES: tuple[str, ...] = ("running", "preempting", "queued", "expired")

# Backpressure levels, calmest first (`queue` topic `level`, `backpressure` events).
LEVELS: tuple[str, ...] = ("healthy", "elevated", "critical")

# A job's (and a job item's) state.
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "cancelled")

# A model's state in models.list, status and the `models` topic.
MODEL_STATES: tuple[str, ...] = ("available", "loading", "loaded", "unloading", "failed")
