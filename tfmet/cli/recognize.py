r"""tfmet-recognize: which Met exhibit does each photo show (or "not in the collection")?

    tfmet-recognize --model exports/rec photo.jpg [more photos or folders] [--json]
        [--info_dir met/ --image_root met/] [--html report.html]

--model is a recogniser export (tfmet-export --kind recognizer); its operating threshold decides
between a Met id and "not in the collection". Per photo: the answer, the confidence and the top-k
alternatives; with --info_dir/--image_root also the database image of each answer. Folders are
searched recursively for image files. A path that is missing or not an image is reported
("tfmet-recognize: skipped PATH: REASON") and the other photos are answered; the exit status is
then 2.
"""

import json
import os
import sys

from absl import flags

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import EXIT_BAD_INPUT, UsageError, report_skipped, run_program
from tfmet.cli.settings import Setting

FLAGS = flags.FLAGS
PROGRAM = "tfmet-recognize"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

RECOGNIZE = (
    *settings_lib.RECOGNIZER,
    Setting("json", False, bool, "One JSON object per photo on stdout (JSON lines)."),
    Setting("html", None, str, "Write an HTML report with thumbnails to this file."),
    Setting("batch_size", 16, int, "Photos per model call."),
    Setting("progress", True, bool, "Progress bar when a folder is given."),
)
settings_lib.define_flags(RECOGNIZE, __name__)


def photo_paths(arguments):
    """Files given plus image files below folders given (sorted); (paths, any folder given).
    A path that does not exist stays in the list (read_photos reports it)."""
    paths, folders = [], False
    for argument in arguments:
        if os.path.isdir(argument):
            folders = True
            for folder, _, names in sorted(os.walk(argument)):
                paths += [
                    os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(EXTENSIONS)
                ]
        else:
            paths.append(argument)
    return paths, folders


def read_photos(paths, skipped):
    """Yields (path, bytes) of the readable images; reports the others on stderr and appends
    their paths to `skipped`.

    Only regular files of at most 64 MiB are read (`tfmet.data.images.read_image_bytes`): a FIFO
    named like a photo in a folder would otherwise block forever.
    """
    from tfmet.data.images import ImageRefused, error_reason, read_image_bytes
    from tfmet.serving import BadImage, check_image

    for path in paths:
        if not os.path.lexists(path):
            reason = "no such file or folder"
        else:
            try:
                data = read_image_bytes(path)
                check_image(data)
            except ImageRefused as e:
                reason = error_reason(e)
            except OSError as e:
                reason = e.strerror or str(e)
            except BadImage as e:
                reason = str(e)
            else:
                yield path, data
                continue
        report_skipped(PROGRAM, path, reason)
        skipped.append(path)


def _print(path, answer, gallery, threshold):
    record = {"path": path, **answer.to_json(), "threshold": threshold}
    if gallery is not None:
        record["database_image"] = gallery.relative_path(answer.met_id) if answer.accepted else None
    if FLAGS.json:
        print(json.dumps(record), flush=True)
        return
    where = f"  [{record['database_image']}]" if record.get("database_image") else ""
    others = ", ".join(f"{m} ({s:.3f})" for m, s in answer.top[1:])
    print(f"{path}: {answer.describe(threshold)}{where}")
    if others:
        print(f"    alternatives: {others}")


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv):
    if not FLAGS.model:
        raise UsageError("--model is required")
    if len(argv) < 2:
        raise UsageError("give at least one photo or folder")
    if FLAGS.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    from tqdm import tqdm

    from tfmet.serving import html_report, open_recognizer

    paths, folders = photo_paths(argv[1:])
    recognizer, gallery = open_recognizer(FLAGS.model, FLAGS.info_dir, FLAGS.image_root, FLAGS.mini)
    bar = tqdm(total=len(paths), unit="photo", disable=not (folders and FLAGS.progress))
    rows, skipped = [], []
    for batch in _batches(read_photos(paths, skipped), FLAGS.batch_size):
        answers = recognizer.recognize([data for _, data in batch])
        for (path, data), answer in zip(batch, answers, strict=True):
            _print(path, answer, gallery, recognizer.threshold)
            rows.append((path, data, answer) if FLAGS.html else None)
        bar.update(len(batch))
    bar.close()
    if FLAGS.html:
        html_report.write_html(FLAGS.html, rows, gallery, recognizer.threshold)
        print(f"report: {FLAGS.html}", file=sys.stderr)
    if not rows:
        raise UsageError("no photo could be read")
    return EXIT_BAD_INPUT if skipped else 0


def run():
    run_program(PROGRAM, main)


if __name__ == "__main__":
    run()
