"""Contract checks that every fedrec component of a kind must pass (like River's ``river.checks``).

They live apart from what they check: :mod:`fedrec.models` knows nothing of the protocol, while
the model checks run each model through the real round (``client_update``, the wire, the
checkpoint, the device SDK). ``fedrec.checks.models.yield_checks(name)`` yields the model checks.
"""

from __future__ import annotations

from .models import yield_checks

__all__ = ["yield_checks"]
