"""Serve an exported student on this machine until stopped (Ctrl-C or SIGTERM).

    python -m jobs.serve --model runs/cxr/export/student [--port 8000] [--replicas N] [--auth_tokens_file F]

Starts a Ray on 127.0.0.1 with Serve's HAProxy ingress (:mod:`kdray.ingress`), deploys the student
(:func:`serve.deploy.deploy`) and prints the address to use: ``http://127.0.0.1:PORT``, HAProxy in front of every
replica. On a cluster use ``serve deploy serve/config.yaml`` or the RayService (docs/deployment.md).
"""

from __future__ import annotations

import signal
import threading

from kdray.config import ServeJobConfig, load_config
from kdray.runner import run_job


def main(argv: list[str]) -> str:
    cfg = load_config(ServeJobConfig, argv)
    from serve.app import access_args
    from serve.deploy import deploy

    extra = {"access_options": access_args({"auth_tokens_file": cfg.auth_tokens_file})} if cfg.auth_tokens_file else {}
    url = deploy(cfg.model, port=cfg.port, backend=cfg.backend, num_replicas=cfg.replicas, **extra)
    print(f"serving {cfg.model} at {url}  (open it in a browser for the viewer, or POST an image to {url}/predict; "
          "Ctrl-C stops)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping", flush=True)
    return url


if __name__ == "__main__":
    run_job(main)
