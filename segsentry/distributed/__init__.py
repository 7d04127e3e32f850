"""``ood-run --ray``: a cohort on a Ray cluster, with the serial run's semantics (``segsentry[distributed]``).

Reading and preprocessing run as CPU tasks, inference in a pool of actors that each hold one engine, writing as
tasks; the stages are the runtime's own (:mod:`segsentry.runtime.batch`, :mod:`segsentry.runtime.pipeline`).
This package sits above the runtime: the runtime never imports it. ``ray`` is imported only when a run starts.
"""

from segsentry.distributed.cluster import RAY_EXTRA, import_ray, ray_session
from segsentry.distributed.driver import RayOptions, run_batch_ray

__all__ = ["RAY_EXTRA", "RayOptions", "import_ray", "ray_session", "run_batch_ray"]
