"""Thin entry points: ``python -m jobs.<stage>``, each submittable with ``ray job submit -- python -m jobs.<stage>``."""
