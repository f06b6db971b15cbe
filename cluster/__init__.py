"""Everything around the product that runs a cluster: the local services (``cluster.local``), the shell scripts,
the AWS cluster-launcher config and the KubeRay manifests. The kdray library never imports it."""
