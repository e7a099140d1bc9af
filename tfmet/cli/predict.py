"""tfmet-predict: top-k labels with probabilities for one or more images.

    tfmet-predict --model runs/pandora18k image1.jpg image2.png
    tfmet-predict --model runs/pandora18k/classifier.keras --top_k 3 --flip_bagging painting.jpg
    tfmet-predict --model runs/pandora18k --nearest 5 painting.jpg   # + nearest training paintings

--model is a run directory, a .keras file, a checkpoint .weights.h5 (in a run), or an exported
SavedModel directory (tfmet-export). A file that is missing, not a regular file, holds more than
--max_bytes bytes or declares more than --max_pixels pixels is reported ("tfmet-predict: skipped
PATH: REASON") and skipped, never decoded, and the others are answered; the exit status is then
2. Settings can come from a config file (`--config=predict.py`, whose get_config() returns a
ConfigDict of some of them, e.g. model and top_k); flags given on the command line override it
(settings: the defaults <- the config file and its `--config.<key>=<value>` <- flags given).
"""

import json

from absl import flags
from ml_collections import config_flags

from tfmet.cli import input_flags  # --max_pixels, --max_bytes
from tfmet.cli import settings as settings_lib
from tfmet.cli.common import EXIT_BAD_INPUT, UsageError, report_skipped, require, run_program
from tfmet.cli.settings import Setting

FLAGS = flags.FLAGS
PROGRAM = "tfmet-predict"

# tfmet-predict's own settings (with input_flags': what its --config may set).
PREDICT = (
    Setting("model", None, str, "Run dir, .keras, .weights.h5 or SavedModel dir."),
    Setting("top_k", 5, int, "Labels to print per attribute."),
    Setting("flip_bagging", False, bool, "Average with the mirror image's prediction."),
    Setting("nearest", 0, int, "Also list the N nearest paintings of the run."),
    Setting("nearest_split", "train", ("train", "val", "test"), "Split searched by --nearest."),
    Setting("json", False, bool, "Print one JSON object per image instead of text."),
    Setting("trust_model", False, bool, "Allow loading hub modules from the model file."),
)
settings_lib.define_flags(PREDICT, __name__)
config_flags.DEFINE_config_file("config", None, settings_lib.config_help("e.g. model, top_k"))


def settings():
    """The run's settings: the defaults, then the config file's, then the flags given."""
    values = settings_lib.resolve(
        settings_lib.config(settings_lib.INPUT, PREDICT), FLAGS.config, PROGRAM
    )
    settings_lib.check(values, settings_lib.INPUT, PREDICT)
    return values


def main(argv):
    paths = argv[1:]
    values = settings()
    require(values, "model")
    if not paths:
        raise UsageError("give one or more image files")
    if values["top_k"] < 1:
        raise UsageError(f"--top_k must be positive, got {values['top_k']}")
    input_flags.check(values)
    from tfmet.training.style import predict as style_predict
    from tfmet.training.style import trained_run

    predictor = style_predict.load_predictor(values["model"], trust_model=values["trust_model"])
    images, good, errors = style_predict.read_images(
        paths, predictor.image_size, max_pixels=values["max_pixels"], max_bytes=values["max_bytes"]
    )
    for path, reason in errors:  # bad files are reported and skipped; the exit status says so
        report_skipped(PROGRAM, path, reason)
    if not good:
        raise UsageError("no image could be read")
    probabilities = predictor.probabilities(images, flip_bagging=values["flip_bagging"])
    nearest = None
    if values["nearest"]:
        if predictor.classifier is None:
            raise UsageError("--nearest needs a training run or a .keras model, not a SavedModel")
        nearest = style_predict.nearest_in_run(
            trained_run.run_dir_of(values["model"]),
            predictor.classifier,
            predictor.features(images),
            split=values["nearest_split"],
            k=values["nearest"],
        )
    for row, path in enumerate(good):
        result = {
            attribute: style_predict.top_k_labels(
                p[row], predictor.class_names[attribute], values["top_k"]
            )
            for attribute, p in probabilities.items()
        }
        if values["json"]:
            record = {
                "image": path,
                **{
                    a: [{"label": n, "probability": q} for n, q in labels]
                    for a, labels in result.items()
                },
            }
            if nearest is not None:
                record["nearest"] = [
                    {"path": p, "label": n, "similarity": s} for p, n, s in nearest[row]
                ]
            print(json.dumps(record))
            continue
        print(path)
        for attribute, labels in result.items():
            print(f"  {attribute}: " + ", ".join(f"{n} {q:.4f}" for n, q in labels))
        if nearest is not None:
            for p, n, s in nearest[row]:
                print(f"  nearest: {p} ({n}) similarity {s:.4f}")
    return EXIT_BAD_INPUT if errors else 0


def run():
    run_program(PROGRAM, main)


if __name__ == "__main__":
    run()
