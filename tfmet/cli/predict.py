"""tfmet-predict: top-k labels with probabilities for one or more images.

    tfmet-predict --model runs/pandora18k image1.jpg image2.png
    tfmet-predict --model runs/pandora18k/classifier.keras --top_k 3 --flip_bagging painting.jpg
    tfmet-predict --model runs/pandora18k --nearest 5 painting.jpg   # + nearest training paintings

--model is a run directory, a .keras file, a checkpoint .weights.h5 (in a run), or an exported
SavedModel directory (tfmet-export).
"""

import json
import sys

from absl import app, flags

import tfmet.cli  # noqa: F401  (quiet TensorFlow start-up)

_MODEL = flags.DEFINE_string("model", None, "Run dir, .keras, .weights.h5 or SavedModel dir.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Labels to print per attribute.")
_FLIP = flags.DEFINE_bool("flip_bagging", False, "Average with the mirror image's prediction.")
_NEAREST = flags.DEFINE_integer("nearest", 0, "Also list the N nearest paintings of the run.")
_NEAREST_SPLIT = flags.DEFINE_enum(
    "nearest_split", "train", ["train", "val", "test"], "Split searched by --nearest."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per image instead of text.")
_TRUST = flags.DEFINE_bool("trust_model", False, "Allow loading hub modules from the model file.")
flags.mark_flags_as_required(["model"])


def main(argv):
    paths = argv[1:]
    if not paths:
        print("tfmet-predict: error: give one or more image files", file=sys.stderr)
        return 2
    if _TOP_K.value < 1:
        print(
            f"tfmet-predict: error: --top_k must be positive, got {_TOP_K.value}", file=sys.stderr
        )
        return 2
    from tfmet.training import style_predict, style_run

    try:
        predictor = style_predict.load_predictor(_MODEL.value, trust_model=_TRUST.value)
        images, good, errors = style_predict.read_images(paths, predictor.image_size)
        for path, reason in errors:
            print(f"tfmet-predict: error: {path}: {reason}", file=sys.stderr)
        if not good:
            return 2
        probabilities = predictor.probabilities(images, flip_bagging=_FLIP.value)
        nearest = None
        if _NEAREST.value:
            if predictor.classifier is None:
                raise ValueError(
                    "--nearest needs a training run or a .keras model, not a SavedModel"
                )
            workdir = style_run.run_dir_of(_MODEL.value)
            nearest = style_predict.nearest_in_run(
                workdir,
                predictor.classifier,
                predictor.features(images),
                split=_NEAREST_SPLIT.value,
                k=_NEAREST.value,
            )
    except (ValueError, FileNotFoundError) as e:
        print(f"tfmet-predict: error: {e}", file=sys.stderr)
        return 2
    for row, path in enumerate(good):
        result = {
            attribute: style_predict.top_k_labels(
                p[row], predictor.class_names[attribute], _TOP_K.value
            )
            for attribute, p in probabilities.items()
        }
        if _JSON.value:
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
    return 2 if errors else 0


def run():
    app.run(main)


if __name__ == "__main__":
    run()
