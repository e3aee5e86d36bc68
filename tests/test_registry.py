"""Every choice is named once, in fedrec.registry; config, CLI, models, server optimizer and wire take it from there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedrec import registry
from fedrec.config import RunConfig
from fedrec.registry import Registry


def test_names_keep_their_fixed_order():
    assert registry.MODELS.names() == ("mf", "neumf", "sasrec", "deepfm")
    assert registry.AGGREGATORS.names() == ("mean", "trimmed-mean", "median")
    assert registry.SERVER_OPTIMIZERS.names() == ("fedavg", "fedadagrad", "fedadam", "fedyogi")
    assert registry.WIRES.names() == ("auto", "dense", "fp16", "sparse")
    assert registry.ACCOUNTANTS.names() == ("prv", "rdp")
    assert registry.PRIVACY_MODES.names() == ("none", "event", "user", "both")
    assert set(registry.EVENT_DP_MODES) | set(registry.USER_DP_MODES) < set(registry.PRIVACY_MODES)


def test_an_unknown_name_is_one_sentence():
    with pytest.raises(ValueError) as e:
        registry.MODELS.get("bert")
    assert str(e.value) == "Unknown model 'bert'; expected one of mf, neumf, sasrec, deepfm."
    with pytest.raises(ValueError, match="Unknown server optimizer 'sgd'; expected one of fedavg, fedadagrad"):
        registry.SERVER_OPTIMIZERS.check("sgd")
    assert registry.WIRES.check("fp16") == "fp16"
    assert "fp16" in registry.WIRES and None not in registry.WIRES and len(registry.WIRES) == 4


def test_a_plain_choice_has_no_object_to_load():
    with pytest.raises(LookupError, match="plain choice"):
        registry.WIRES.get("dense")


def test_targets_load_lazily_on_get():
    reg = Registry("thing", {"path": "pathlib:PurePosixPath", "ghost": "fedrec.no_such_module:X"})
    from pathlib import PurePosixPath

    assert reg.get("path") is PurePosixPath
    with pytest.raises(ModuleNotFoundError):  # the target is imported only when asked for
        reg.get("ghost")


def test_models_resolve_to_their_classes():
    from fedrec.models.deepfm import DeepFM
    from fedrec.models.mf import MF
    from fedrec.models.neumf import NeuMF
    from fedrec.models.sasrec import SASRec

    assert [registry.MODELS.get(n) for n in registry.MODELS] == [MF, NeuMF, SASRec, DeepFM]


def test_accountants_resolve_to_opacus_classes():
    from opacus.accountants import PRVAccountant, RDPAccountant

    assert registry.ACCOUNTANTS.get("prv") is PRVAccountant and registry.ACCOUNTANTS.get("rdp") is RDPAccountant


def test_every_choice_list_comes_from_the_registry():
    from fedrec import models, server_opt, wire

    specs = RunConfig.specs()
    for key, reg in [("model", registry.MODELS), ("aggregator", registry.AGGREGATORS),
                     ("server-opt", registry.SERVER_OPTIMIZERS), ("wire", registry.WIRES),
                     ("accountant", registry.ACCOUNTANTS), ("privacy", registry.PRIVACY_MODES),
                     ("engine", registry.ENGINES), ("method", registry.METHODS),
                     ("lr-schedule", registry.LR_SCHEDULES), ("round-split", registry.ROUND_SPLITS),
                     ("clock", registry.CLOCKS), ("update-backend", registry.UPDATE_BACKENDS)]:
        assert specs[key][2].choices == reg.names(), key
    assert models.MODELS == registry.MODELS.names()
    assert server_opt.SERVER_OPTS == registry.SERVER_OPTIMIZERS.names()
    assert wire.WIRES == registry.WIRES.names()


def test_importing_the_config_imports_no_torch():
    code = "import sys, fedrec.config, fedrec.registry; print(sorted(m for m in ('torch', 'numpy', 'opacus') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
