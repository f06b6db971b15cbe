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

from kdray.images import SERVING_LIMITS

#: Serve's HTTP callback: a replica's direct-ingress server calls it for extra (outermost) middlewares. Set in
#: the replica's runtime env below, it installs kdray's admission gate in front of Serve (serve/admission.py).
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.admission:replica_middlewares"

#: Batching of the replica: ``enabled`` is ``"auto"`` (on when the model runs on a GPU), True or False.
#: On a CPU it does not pay here: MobileNetV2 int8 costs about the same core time per image at batch 32
#: as at batch 1, and the batcher's hops cost more than it saves (docs/architecture.md, "Measured choices").
#: When on: at most ``max_batch_size`` images per model call; a batch closes ``batch_wait_timeout_s`` after
#: its first image arrives (images that arrive while a batch runs join the next one anyway).
BATCHING = {"enabled": "auto", "max_batch_size": 16, "batch_wait_timeout_s": 0.002}

#: What each image of a request may be and cost (kdray.images): the serving decode budget is half of scoring's,
#: since a replica decodes WORKER_THREADS images at once beside its model and explanations.
IMAGE_LIMITS = SERVING_LIMITS

#: Bytes a request body may have (checked from Content-Length before reading; chunked bodies as they stream):
#: one image at the size limit, and room for a multipart envelope around it.
MAX_BODY_BYTES = IMAGE_LIMITS.max_bytes + 2**20

#: Threads per replica that decode (and, on a CPU, classify) images off the event loop, each one image at a
#: time with single-threaded inference.
WORKER_THREADS = 2

#: Admission control in each replica (serve/admission.py): at most ``limit`` inference requests (POST
#: /predict, /v2/models/.../infer) at once; the excess is held ``hold_s`` and answered 503 + Retry-After.
#: It runs in front of Serve's direct-ingress entry point (the replica's runtime env below) and, as a
#: fallback, inside the FastAPI app. ``KDRAY_ADMISSION_LIMIT`` in a replica's environment overrides ``limit``.
ADMISSION = {"limit": 64, "hold_s": 0.025, "prefixes": ("/predict", "/v2/models")}

#: The replica's GIL switch interval: pool threads decoding and classifying hand the GIL back to the event loop
#: (which answers, admits and refuses requests) at least this often (Python's default is 5 ms).
SWITCH_INTERVAL_S = 0.001

#: Deployment options owned here (``@serve.deployment(**DEPLOYMENT)``). Serve's own limits sit above the
#: admission limit: with direct ingress, requests over ``max_ongoing_requests`` queue in Serve before
#: kdray's admission sees them, and Serve's 503 comes at once (a retry storm from clients that ignore
#: Retry-After); the admission hold paces them instead.
DEPLOYMENT = {
    "max_ongoing_requests": 256,
    "max_queued_requests": 64,
    "backpressure_config": {"status_code": 503, "retry_after_s": 1},
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                           "upscale_delay_s": 5, "downscale_delay_s": 30},
    # A replica keeps WORKER_THREADS threads busy, so it asks for that many CPUs: the autoscaler then adds a
    # replica only where CPUs are free (or asks the cluster for a node), never onto a node its replicas already
    # saturate. (At 0.5 CPU, a 2-core node took a second replica whose start-up cost the first one a third of
    # its throughput, and which added none: bench/results/serve.md.) serve.app.deploy fits it to the CPUs free.
    # The replica's own environment names kdray's admission as Serve's HTTP callback, so that its direct-ingress
    # server refuses excess requests before Serve's entry point (serve/admission.py); Serve merges these
    # env_vars with the application's runtime_env.
    "ray_actor_options": {"num_cpus": float(WORKER_THREADS), "runtime_env": {"env_vars": {CALLBACK_ENV: CALLBACK}}},
}

#: Keys of a deployment that only this module sets (config files may set the others).
OWNED_KEYS = ("max_ongoing_requests", "max_queued_requests", "backpressure_config")

#: Grad-CAM explanations (``?explain=true``, the OIP ``explain`` parameter; serve/explaining.py): each replica
#: runs at most ``max_in_flight`` explanation requests at once, one at a time in one thread of ``threads``
#: torch threads, beside the prediction pool; the excess is answered 503 + Retry-After (reason
#: ``explain_busy``) at once, so explanations never queue in front of predictions. The explanation thread
#: runs at Linux niceness ``nice`` (per thread): it gets the CPU that predictions leave idle, and little more.
EXPLAIN = {"max_in_flight": 2, "threads": 1, "nice": 19}
