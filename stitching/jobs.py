"""What a job of a sweep needs before it imports torch: its share of the machine's cores.
(Light at import: a launcher's process loads this and Hydra only.)"""

from __future__ import annotations

import os


def share_threads(n_jobs, cores: int | None = None) -> int | None:
    """Give this job its share of the cores when ``n_jobs`` run at once on this machine (joblib:
    ``hydra/launcher=local``; -1 = one per core): torch threads = cores / jobs, at least one.
    Every job on all cores oversubscribes them and makes a parallel sweep slower than a serial one."""
    if n_jobs is None:
        return None
    cores = cores or os.cpu_count() or 1
    jobs = cores if int(n_jobs) < 0 else int(n_jobs)
    if jobs <= 1:
        return None
    threads = max(1, cores // jobs)
    import torch  # the job's own import: the launcher's process never needs it

    torch.set_num_threads(threads)
    return threads
