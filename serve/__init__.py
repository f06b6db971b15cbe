"""Ray Serve deployment of the distilled student (``serve.app``; knobs in ``serve/options.py``).

Importing it starts nothing; ``serve.deploy.deploy`` keeps the local Ray it starts on loopback
(``kdray.raycluster.init_ray``), whatever was imported first."""
