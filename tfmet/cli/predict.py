"""tfmet-predict: top-k labels with probabilities for one or more images.

    tfmet-predict --model runs/pandora18k image1.jpg image2.png
    tfmet-predict --model runs/pandora18k/classifier.keras --top_k 3 --flip_bagging painting.jpg
    tfmet-predict --model runs/pandora18k --nearest 5 painting.jpg   # + nearest training paintings

--model is a run directory, a .keras file, a checkpoint .weights.h5 (in a run), or an exported
SavedModel directory (tfmet-export). A file that is missing, not a regular file, holds more than
--max_bytes bytes or declares more than --max_pixels pixels is reported ("tfmet-predict: skipped
PATH: REASON") and skipped, never decoded, and the others are answered; the exit status is then
2.
"""

import json

from absl import flags

from tfmet.cli import input_flags  # --max_pixels, --max_bytes
from tfmet.cli.common import EXIT_BAD_INPUT, UsageError, report_skipped, require, run_program

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Run dir, .keras, .weights.h5 or SavedModel dir.")
flags.DEFINE_integer("top_k", 5, "Labels to print per attribute.")
flags.DEFINE_bool("flip_bagging", False, "Average with the mirror image's prediction.")
flags.DEFINE_integer("nearest", 0, "Also list the N nearest paintings of the run.")
flags.DEFINE_enum(
    "nearest_split", "train", ["train", "val", "test"], "Split searched by --nearest."
)
flags.DEFINE_bool("json", False, "Print one JSON object per image instead of text.")
flags.DEFINE_bool("trust_model", False, "Allow loading hub modules from the model file.")


def main(argv):
    paths = argv[1:]
    require(FLAGS.flag_values_dict(), "model")
    if not paths:
        raise UsageError("give one or more image files")
    if FLAGS.top_k < 1:
        raise UsageError(f"--top_k must be positive, got {FLAGS.top_k}")
    input_flags.check(FLAGS.flag_values_dict())
    from tfmet.training.style import predict as style_predict
    from tfmet.training.style import trained_run

    predictor = style_predict.load_predictor(FLAGS.model, trust_model=FLAGS.trust_model)
    images, good, errors = style_predict.read_images(
        paths, predictor.image_size, max_pixels=FLAGS.max_pixels, max_bytes=FLAGS.max_bytes
    )
    for path, reason in errors:  # bad files are reported and skipped; the exit status says so
        report_skipped("tfmet-predict", path, reason)
    if not good:
        raise UsageError("no image could be read")
    probabilities = predictor.probabilities(images, flip_bagging=FLAGS.flip_bagging)
    nearest = None
    if FLAGS.nearest:
        if predictor.classifier is None:
            raise UsageError("--nearest needs a training run or a .keras model, not a SavedModel")
        nearest = style_predict.nearest_in_run(
            trained_run.run_dir_of(FLAGS.model),
            predictor.classifier,
            predictor.features(images),
            split=FLAGS.nearest_split,
            k=FLAGS.nearest,
        )
    for row, path in enumerate(good):
        result = {
            attribute: style_predict.top_k_labels(
                p[row], predictor.class_names[attribute], FLAGS.top_k
            )
            for attribute, p in probabilities.items()
        }
        if FLAGS.json:
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
    run_program("tfmet-predict", main)


if __name__ == "__main__":
    run()
