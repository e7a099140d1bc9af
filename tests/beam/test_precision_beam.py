"""The Beam pipeline takes its precision from the descriptor export it runs (older exports, which
do not record one, are float32), and a run's export is reused only in the same precision."""

import pytest

from tests.kit.exports import write_descriptor_metadata
from tfmet.beam import pipeline
from tfmet.descriptors import spec as spec_lib
from tfmet.precision import precision_version

BFLOAT16_VERSION = precision_version("bfloat16")


def test_saved_model_spec_reads_the_precision(tmp_path):
    write_descriptor_metadata(tmp_path / "old")
    assert pipeline.saved_model_spec(str(tmp_path / "old")).precision == "float32"
    write_descriptor_metadata(
        tmp_path / "bf16", precision="bfloat16", precision_version=BFLOAT16_VERSION
    )
    assert pipeline.saved_model_spec(str(tmp_path / "bf16")).precision == "bfloat16"
    metadata = pipeline.model_metadata(pipeline.saved_model_spec(str(tmp_path / "bf16")))
    assert metadata["precision"] == "bfloat16" and metadata["precision_version"] == BFLOAT16_VERSION


@pytest.mark.parametrize("version", [None, 2])
def test_an_export_of_an_older_bfloat16_is_refused(tmp_path, version):
    # None: every layer in bfloat16 (no field); 2: EfficientNet-Lite's first block still in it.
    fields = {} if version is None else {"precision_version": version}
    write_descriptor_metadata(tmp_path / "bf16", precision="bfloat16", **fields)
    expected = rf"older tfmet whose bfloat16 .*\(precision_version {version or 1}\)"
    with pytest.raises(ValueError, match=expected):
        pipeline.saved_model_spec(str(tmp_path / "bf16"))


def test_an_export_of_another_precision_is_not_reused(tmp_path):
    write_descriptor_metadata(
        tmp_path / "model", precision="bfloat16", precision_version=BFLOAT16_VERSION
    )
    spec = spec_lib.ExtractionSpec(
        "resnet18", "sha256:00", (1.0,), "torch", None, 512, precision="float32"
    )
    with pytest.raises(ValueError, match="holds a descriptor model with other settings"):
        pipeline.export_descriptor_model(None, spec, str(tmp_path / "model"))
