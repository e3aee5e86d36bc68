"""Checkpoints as an earlier version wrote them, for the resume tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def forget_config_key(path: Path, key: str) -> None:
    """Rewrite the checkpoint at ``path`` without ``key`` in its run's config, as written before the key existed."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    run = json.loads(str(arrays["run"]))
    del run["config"][key]
    arrays["run"] = np.asarray(json.dumps(run))
    np.savez(path, **arrays)
