"""Ray Serve deployment of the distilled student (``serve.app``; config in ``serve/config.yaml``)."""
