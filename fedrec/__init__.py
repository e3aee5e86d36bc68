"""fedrec: federated, differentially private online learning of recommenders.

The protocol is written once, as plain functions in this package; the Flower apps are thin
adapters around it. ``fedrec.clients`` (the device SDK and ClientApp) and ``fedrec.server``
(the ServerApp) live in the top-level ``clients/`` and ``server/`` folders, mapped into this
package by ``[tool.setuptools.package-dir]`` in ``pyproject.toml``.

This module imports nothing, so ``import fedrec.<part>`` stays as cheap as the part itself.
"""
