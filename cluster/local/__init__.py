"""Local stand-ins for what a deployment provides, for tests, benchmarks and the embedded demo: a SeaweedFS S3
on loopback (``s3``), a multi-node Ray cluster on one machine (``ray_cluster``) and the generated demo data set
(``demo_data``). Entry points (jobs/, serve/, bench/, the scripts in cluster/) and tests import them; the kdray
library does not (tests/test_architecture.py)."""
