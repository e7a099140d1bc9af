r"""tfmet-collection: add or remove exhibits of a recogniser export without rebuilding it.

    tfmet-collection list --export exports/rec
    tfmet-collection add --export exports/rec --backbone resnet18 --weights r18.weights.h5 \
        --met_id 436535 --images new/436535_front.jpg,new/436535_back.jpg
    tfmet-collection remove --export exports/rec --backbone resnet18 \
        --weights r18.weights.h5 --met_id 436535          # or --image MET/436535/front.jpg

`add` describes the images with the export's own model (--backbone + --weights or --model, as
given to tfmet-export; a different model is refused) and its settings and PCA-whitening, and
appends them to its database; `remove` drops an exhibit's rows or one image's row. The changed
export replaces the old one atomically (or goes to --out, a new version beside it), with the
rows' ground truth (assets/MET_database.json) and what changed (metadata "collection").
A running tfmet-serve picks it up through POST /v1/reload (from 127.0.0.1): --reload_url asks it.
The first change of an export tfmet-export wrote takes --info_dir (the ground truth it was
built from) to name its rows. See docs/collection.md.
"""

import json

from absl import flags

from tfmet.cli import model_flags  # the descriptor model, as tfmet-export
from tfmet.cli import settings as settings_lib
from tfmet.cli.common import RunFailure, UsageError, require, run_program
from tfmet.cli.settings import Setting

FLAGS = flags.FLAGS
PROGRAM = "tfmet-collection"
ACTIONS = ("add", "remove", "list")

# tfmet-collection's own settings (the model's are model_flags', as tfmet-export's).
# fmt: off
COLLECTION = (
    Setting("export", None, str, "Recogniser export directory to change."),
    Setting("out", None, str, "Write the new version here (default: replace --export)."),
    Setting("met_id", None, int, "Met id to add images to, or to remove."),
    Setting("images", [], list, "add: image files of --met_id (comma-separated)."),
    Setting("image", None, str, "remove: the ground-truth path of one image (list shows them)."),
    Setting("info_dir", None, str, "Met ground truth the export was built from (first change)."),
    settings_lib.MINI,
    Setting("reload_url", None, str, "tfmet-serve to reload afterwards: http://127.0.0.1:8080"),
    Setting("rebuild_below_target", False, bool,
            "ScaNN: rebuild the tree when the changed one's recall is low."),
)
# fmt: on
settings_lib.define_flags(COLLECTION, __name__)


def _list(collection):
    meta = collection.metadata.get("collection") or {}
    print(
        f"{collection.path}: version {collection.version}, {len(collection.labels)} images of "
        f"{len(collection.exhibits())} exhibits, searcher {collection.metadata.get('searcher')}"
    )
    for change in meta.get("changes", []):
        print(f"  change: {json.dumps(change, sort_keys=True)}")
    if FLAGS.met_id is not None:
        for entry in collection.ground_truth():
            if entry["id"] == FLAGS.met_id:
                print(f"  {entry['id']}\t{entry['path']}")
    else:
        for met_id, count in collection.exhibits().items():
            print(f"  {met_id}\t{count} images")


def _change(action, collection):
    from tfmet.export import collection as lib

    if action == "add" and (FLAGS.met_id is None or not FLAGS.images):
        raise UsageError("add needs --met_id and --images")
    if action == "remove" and (FLAGS.met_id is None) == (FLAGS.image is None):
        raise UsageError("remove needs --met_id or --image (one of them)")
    # Both rebuild the recogniser around the export's model: it must be the given one.
    extractor, spec = model_flags.build_extractor(model_flags.values())
    lib.check_model(collection, spec)
    if action == "add":
        changed = lib.add_images(collection, extractor, FLAGS.met_id, FLAGS.images)
        change = {"action": "add", "met_id": FLAGS.met_id, "images": len(FLAGS.images)}
    else:
        changed = lib.remove_rows(collection, met_id=FLAGS.met_id, image=FLAGS.image)
        removed = len(collection.labels) - len(changed.labels)
        change = {"action": "remove", "met_id": FLAGS.met_id, "image": FLAGS.image}
        change["images"] = removed
    return changed, extractor, change


def _report(out, meta):
    record = meta["collection"]
    print(
        f"{PROGRAM}: wrote version {record['version']} to {out} ({meta['database_size']} images "
        f"of {meta['num_classes']} exhibits)"
    )
    if "recall" in record:
        below = record["recall"] < record["min_recall"]
        print(
            f"{PROGRAM}: recall@{meta['k']} against exact search on a sample of rows: "
            f"{record['recall']:.4f} (target {record['min_recall']})"
            + (
                ": below the target, export again with tfmet-knn-eval's calibration"
                if below
                else ""
            )
        )


def _reload(url):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/reload", b""), timeout=600):
            print(f"{PROGRAM}: {url} reloaded")
    except (urllib.error.URLError, OSError) as e:
        raise RunFailure(
            f"{url}/v1/reload: {getattr(e, 'reason', e)} (the new version is written; "
            "reload the server by hand)"
        ) from None


def main(argv):
    if len(argv) != 2 or argv[1] not in ACTIONS:
        raise UsageError(f"usage: {PROGRAM} {'|'.join(ACTIONS)} --export DIR [flags]")
    require(FLAGS.flag_values_dict(), "export")
    from tfmet.export import collection as lib

    action = argv[1]
    if action == "list":
        _list(lib.open_collection(FLAGS.export, FLAGS.info_dir, FLAGS.mini))
        return
    out = FLAGS.out or FLAGS.export
    with lib.writer_lock(FLAGS.export):
        collection = lib.open_collection(FLAGS.export, FLAGS.info_dir, FLAGS.mini)
        changed, extractor, change = _change(action, collection)
        meta = lib.save_collection(
            changed, extractor, out, change, rebuild_below_target=FLAGS.rebuild_below_target
        )
    _report(out, meta)
    if FLAGS.reload_url:
        _reload(FLAGS.reload_url.rstrip("/"))


def run():
    run_program(PROGRAM, main)


if __name__ == "__main__":
    run()
