"""The one source of the serving knobs: batching, request limits, overload behaviour and autoscaling.

``serve/app.py`` builds its deployment from :data:`DEPLOYMENT` and its batcher from :data:`BATCHING`.
``serve/config.yaml`` and the KubeRay RayService (``cluster/kuberay/rayservice-student.yaml``) do not repeat
these knobs: a Serve config overrides a deployment field by field, so what they leave out comes from here.
They set only what differs per environment (replica bounds, CPUs per replica); ``tests/test_serve.py`` and
``tests/test_cluster.py`` fail if one of them sets a knob owned here.

Overload: a replica runs at most ``max_ongoing_requests`` at once; each caller (the HTTP proxy) queues at
most ``max_queued_requests`` more; past that, Serve answers at once ``503`` with ``Retry-After``
(``backpressure_config``) instead of letting latency grow without bound.
"""

from __future__ import annotations

#: ``@serve.batch`` of the replica: at most this many images per model call; a batch is closed this long
#: after its first image arrives (images that arrive while a batch runs join the next one anyway).
BATCHING = {"max_batch_size": 16, "batch_wait_timeout_s": 0.002}

#: Bytes a request body may have (checked from Content-Length before reading; chunked bodies as they stream).
MAX_BODY_BYTES = 32 * 1024 * 1024

#: Threads per replica that decode images off the event loop.
DECODE_THREADS = 2

#: Deployment options owned here (``@serve.deployment(**DEPLOYMENT)``).
DEPLOYMENT = {
    "max_ongoing_requests": 32,
    "max_queued_requests": 64,
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                           "upscale_delay_s": 5, "downscale_delay_s": 30},
    "ray_actor_options": {"num_cpus": 0.5},
}

#: Keys of a deployment that only this module sets (config files may set the others).
OWNED_KEYS = ("max_ongoing_requests", "max_queued_requests", "backpressure_config")
