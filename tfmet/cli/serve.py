r"""tfmet-serve: a web page and a JSON endpoint answering photos with a recogniser export.

    tfmet-serve --model exports/rec [--info_dir met/ --image_root met/]
        [--host 127.0.0.1 --port 8080]

Open http://127.0.0.1:8080/ and drop a photo; programs POST to /v1/recognize (multipart field
"image", or JSON {"image_base64": ...}); POST /v1/reload from 127.0.0.1 serves the export's new
version (tfmet-collection) without dropping a request. Binds to 127.0.0.1 unless --host says
otherwise. Needs the `[web]` extra: pip install -e ".[web]". See docs/recognize.md.
"""

import os

from absl import flags

from tfmet.cli import settings as settings_lib
from tfmet.cli.common import UsageError, run_program
from tfmet.cli.settings import Setting

FLAGS = flags.FLAGS
PROGRAM = "tfmet-serve"

# fmt: off
SERVE = (
    *settings_lib.RECOGNIZER,
    Setting("names", None, str,
            "Exhibit names: JSON {\"<Met id>\": \"name\"} or The Met's MetObjects.csv."),
    Setting("host", "127.0.0.1", str, "Address to bind (0.0.0.0 exposes it to the network)."),
    Setting("port", 8080, int, "Port to listen on."),
    # Refusing what costs too much memory, and shedding load (tfmet.serving.web.Shedding).
    Setting("max_upload_mb", 20, int, "Uploads above this many MiB are refused (413)."),
    Setting("max_decoded_mb", 256, int,
            "Images declaring more decoded MiB (w x h x channels x bytes) get 422."),
    Setting("concurrency", 2, int, "Requests decoding and inferring at once."),
    Setting("queue", 16, int, "Requests waiting beyond those; more get 503 + Retry-After."),
    Setting("queue_timeout", 60.0, float, "Seconds a request waits for a slot before 503."),
    Setting("body_timeout", 30.0, float, "Seconds an upload may take to arrive before 408."),
    Setting("header_timeout", 10.0, float, "Seconds a connection may take to send its headers."),
)
# fmt: on
settings_lib.define_flags(SERVE, __name__)

# oneDNN's CPU allocator pools what TensorFlow frees and never returns it: one large upload left
# the server at 5x its warm RSS for good (issue #27). Eigen's kernels allocate from the heap,
# which `tfmet.serving.web.release_freed_memory` trims after each request. Set before TensorFlow
# loads; a value in the environment wins.
ONEDNN = ("TF_ENABLE_ONEDNN_OPTS", "0")


def main(argv):
    os.environ.setdefault(*ONEDNN)
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model:
        raise UsageError("--model is required")
    if FLAGS.max_upload_mb < 1:
        raise UsageError(f"--max_upload_mb must be >= 1, got {FLAGS.max_upload_mb}")
    if FLAGS.max_decoded_mb < 1:
        raise UsageError(f"--max_decoded_mb must be >= 1, got {FLAGS.max_decoded_mb}")
    try:
        import uvicorn

        from tfmet.serving.web import Shedding, create_app, fix_mmap_threshold, server_config
    except ImportError as e:
        raise UsageError(f'{e}; install the web extra: pip install -e ".[web]"') from None
    from tfmet.serving import open_recognizer

    try:
        shedding = Shedding(
            concurrency=FLAGS.concurrency,
            queue=FLAGS.queue,
            queue_timeout=FLAGS.queue_timeout,
            body_timeout=FLAGS.body_timeout,
            header_timeout=FLAGS.header_timeout,
        )
    except ValueError as e:
        raise UsageError(str(e).replace("`", "--", 1).replace("`", "", 1)) from None

    fix_mmap_threshold()  # before the model loads: freed images go back to the system
    if FLAGS.names and not FLAGS.info_dir:
        raise UsageError("--names needs --info_dir (the exhibits it names are the database's)")

    def load():  # also the export's next version, on POST /v1/reload (tfmet-collection)
        return open_recognizer(
            FLAGS.model, FLAGS.info_dir, FLAGS.image_root, FLAGS.mini, names=FLAGS.names
        )

    recognizer, gallery = load()
    recognizer.warm_up()
    application = create_app(
        recognizer,
        gallery,
        max_upload_bytes=FLAGS.max_upload_mb << 20,
        shedding=shedding,
        max_decoded_bytes=FLAGS.max_decoded_mb << 20,
        reload=load,
    )
    print(f"{PROGRAM}: serving {FLAGS.model} on http://{FLAGS.host}:{FLAGS.port}/", flush=True)
    config = server_config(application, FLAGS.host, FLAGS.port, shedding, log_level="warning")
    uvicorn.Server(config).run()


def run():
    run_program(PROGRAM, main)


if __name__ == "__main__":
    run()
