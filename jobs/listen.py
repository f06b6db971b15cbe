"""An AI node for pushed images: a DICOM C-STORE SCP that scores CR/DX instances and C-STOREs each one's SR onward.

    python -m jobs.listen --model EXPORT --accepted_calling_aes KDRAYPACS --destination AET@host:port
                          [--ae_title KDRAY] [--host 127.0.0.1] [--port 11112] [--queue_dir .kdray/listen]
                          [--batch_size 16] [--max_wait_s 2] [--max_associations 4] [--max_bytes 134217728]

Against the local PACS (``cluster/local_pacs.sh start && source .kdray/pacs/pacs.env``)::

    python -m jobs.listen --model runs/cxr/export/student --host "$KDRAY_PACS_PEER" \\
        --accepted_calling_aes "$KDRAY_PACS_AET" --destination "$KDRAY_PACS_AET@$KDRAY_PACS_DICOM"

Only associations from ``--accepted_calling_aes`` are accepted (at most ``--max_associations`` at a time), and
only CR and DX storage instances of an allowed Modality; the rest are refused with a status and one log line
(a reason code, no patient data). Each accepted instance is on disk under ``--queue_dir``/queue before it is
acknowledged, so a crash loses none; the same command started again scores what is queued first. SRs whose
destination accepted them leave the queue; refused instances go to ``refused/`` with a ``.reason`` file.
SIGTERM or Ctrl-C stops it: no new associations, the batch in hand finished. No Grad-CAM overlays: SR only
(:mod:`kdray.listener`). The resolved config is written to ``--queue_dir``/args.yaml.
"""

from __future__ import annotations

import os
import signal
import threading

from kdray.config import ListenJobConfig, dump_yaml, load_config
from kdray.runner import run_job


def main(argv: list[str]) -> ListenJobConfig:
    cfg = load_config(ListenJobConfig, argv)
    from kdray.listener import Listener

    listener = Listener(cfg)  # loads the model first: a bad one fails before the port is bound
    os.makedirs(cfg.queue_dir, exist_ok=True)
    with open(os.path.join(cfg.queue_dir, "args.yaml"), "w") as out:
        out.write(dump_yaml(cfg))
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal stops at once (what is queued is safe)
            signal.signal(sig, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    host, port = listener.start()
    print(f"listening as {cfg.ae_title} on {host}:{port}; SRs go to {cfg.destination}; queue {cfg.queue_dir} "
          "(Ctrl-C or SIGTERM stops)", flush=True)
    stop.wait()
    print("stopping: no new associations; finishing the batch in hand", flush=True)
    listener.stop()
    return cfg


if __name__ == "__main__":
    run_job(main)
