"""The test kit: shared helpers, fakes and references for tfmet's tests (see docs/testing.md).

- `run_layer_test`, `run_serialization_test`, `assert_layer_round_trip`: the checks every
  registered Keras class gets (tests/test_registered_classes.py runs them over all of them).
- `tiny_backbone`, `one_conv_backbone`, `relu_backbone`: small Keras backbones (kit.models);
  `calibrate_batchnorm` gives a random trunk's BatchNorms the statistics of an image batch;
  `tiny_spec` the `ExtractionSpec` of `tiny_backbone(seed=3)` for tests' stores.
- `tests.kit.hub_modules`: fake TF-Hub modules with known weights.
- `tests.kit.references`: numpy GeM, PyTorch's bilinear resize, the kNN rule, brute-force search.
- `tests.kit.met_tree`, `tests.kit.style_data`: writers of tiny Met trees and style datasets.
- `run_cli`, `run_command`, `REPO`: programs in subprocesses (kit.cli); `kit.cli.strace` the
  strace prefix of the full-disk tests; `tests.kit.rename_kill.run_renames` a program with its
  renames listed or killed at (the kill-at-every-write tests).
- `tests.kit.torch_models`: torchvision-layout torch modules (imports torch).
- `tests.kit.web`: a free port, waiting for a server, headless chromium through selenium.
"""

from tests.kit.cli import REPO, run_cli, run_command
from tests.kit.layer_test import assert_layer_round_trip, run_layer_test, run_serialization_test
from tests.kit.models import (
    calibrate_batchnorm,
    one_conv_backbone,
    relu_backbone,
    tiny_backbone,
    tiny_spec,
)
from tests.kit.references import numpy_gem

__all__ = [
    "REPO",
    "assert_layer_round_trip",
    "calibrate_batchnorm",
    "numpy_gem",
    "one_conv_backbone",
    "relu_backbone",
    "run_cli",
    "run_command",
    "run_layer_test",
    "run_serialization_test",
    "tiny_backbone",
    "tiny_spec",
]
