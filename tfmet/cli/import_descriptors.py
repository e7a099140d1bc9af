"""tfmet-import-descriptors: the Met reference's descriptors.pkl -> tfmet descriptor stores.

    tfmet-import-descriptors --descriptors=r18INgem/descriptors.pkl --output_dir=desc/r18_ref \
        --info_dir=MET/ground_truth --backbone=r18INgem

The pickle is read with a restricted unpickler that only rebuilds numpy arrays: a file that
asks for anything else is refused before any of its code runs. With --info_dir, row counts are
checked against the JSON ground truth (mini or full database picked by length unless --mini
or --nomini is given) and the paths and labels are recorded in the manifests.
"""

from absl import flags, logging

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import check_outputs, no_arguments, require, run_program
from tfmet.cli.settings import Setting

FLAGS = flags.FLAGS

IMPORT_DESCRIPTORS = (
    Setting("descriptors", None, str, "The reference descriptors.pkl."),
    Setting("output_dir", None, str, "Where the stores go."),
    Setting("info_dir", None, str, "Optional Met ground truth to check counts and record paths."),
    Setting("mini", None, bool, "Train rows follow the mini database (default: match by length)."),
    Setting("backbone", None, str, "Label recorded as the manifests' backbone."),
    Setting("overwrite", False, bool, "Replace existing stores."),
)
settings_lib.define_flags(IMPORT_DESCRIPTORS, __name__)


def main(argv):
    no_arguments(argv)
    require(FLAGS.flag_values_dict(), "descriptors", "output_dir")
    check_outputs(folders=("output_dir",))
    from tfmet.data import descriptor_store as store

    metadata = {} if FLAGS.backbone is None else {"backbone": FLAGS.backbone}
    manifests = store.import_reference_descriptors(
        FLAGS.descriptors,
        FLAGS.output_dir,
        info_dir=FLAGS.info_dir,
        mini=FLAGS.mini,
        overwrite=FLAGS.overwrite,
        **metadata,
    )
    for split, manifest in manifests.items():
        logging.info(
            "%s: %d x %d descriptors written to %s (%d invalid rows)",
            split,
            manifest["count"],
            manifest["dim"],
            store.array_path(FLAGS.output_dir, split),
            len(manifest["errors"]),
        )


def run():
    run_program("tfmet-import-descriptors", main)


if __name__ == "__main__":
    run()
