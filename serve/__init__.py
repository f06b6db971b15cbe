"""Ray Serve deployment of the distilled student (``serve.app``; knobs in ``serve/options.py``).

``kdray`` is imported first: it keeps a local Ray on loopback, which only works if it runs before Ray is
imported (``from serve.app import deploy`` imports Ray)."""

import kdray  # noqa: F401 - for its side effect on the environment, before Ray is imported
