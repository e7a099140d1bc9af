"""Program settings, each defined once: its name, default, type and help, in a `Setting`.

A program's settings are a ConfigDict (`config(...)` of its tables: the defaults) and the absl
flags generated from the same tables (`define_flags`). What a run uses (`resolve`) is, in order:

    the defaults  <-  the --config file (and its --config.<key>=<value>)  <-  flags given

The tables hold no flags of their own, so a config file may start from them
(`configs/extract_met.py`: `extract_config()`) without defining any flag. TF-free.
"""

import sys
import typing

import ml_collections
from absl import flags

from tfmet.cli.common import UsageError
from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tfmet.precision import PRECISIONS


class Setting(typing.NamedTuple):
    """One setting: `kind` is str, int, float, bool, list (of strings) or a tuple of choices;
    `short_name` is the flag's one-letter name, if it has one (tfmet-knn-eval's -d)."""

    name: str
    default: object
    kind: object
    help: str
    short_name: str | None = None


# The descriptor model (tfmet-extract, tfmet-extract-beam, tfmet-export, tfmet-demo).
MODEL = (
    Setting("backbone", "resnet18", str, "Backbone registry name (tfmet.backbones.names())."),
    Setting(
        "weights",
        None,
        str,
        "Backbone weights file, or 'imagenet' for the packaged weights (efficientnet_lite0); "
        "none for a seeded random init.",
    ),
    Setting("model", None, str, "A saved Embedder (.keras) to use instead of --backbone."),
    Setting("seed", 0, int, "Seed of the random initialisation when --weights is not given."),
    Setting("multiscale", True, bool, "Average the scales 1, 1/sqrt(2), 1/2 (else scale 1 only)."),
    Setting("resize_method", "torch", ("torch", "tf"), "Multi-scale resize semantics."),
    Setting("max_side", None, int, "Downscale images whose long side exceeds this."),
    Setting(
        "precision",
        "float32",
        str,
        f"What the backbone computes in: {', '.join(PRECISIONS)} (GeM, L2 and PCA stay float32).",
    ),
)

# The input limits of the programs that read images (defaults and why: tfmet.data.limits).
INPUT = (
    Setting(
        "max_pixels",
        DEFAULT_MAX_PIXELS,
        int,
        "Refuse (as an invalid row) images whose header declares more pixels, before decoding.",
    ),
    Setting(
        "max_bytes", DEFAULT_MAX_BYTES, int, "Refuse (as an invalid row) image files of more bytes."
    ),
)

# The Met ground truth and which database of it a run uses (tfmet-extract, its Beam twin,
# tfmet-knn-eval, tfmet-export; tfmet-recognize and tfmet-serve say what they use it for).
INFO_DIR = Setting(
    "info_dir", None, str, "Folder with MET_database.json, valset.json, testset.json."
)
MINI = Setting("mini", False, bool, "The database is mini_MET_database.json.")

# The Met folders of the programs that read the Met images (tfmet-extract, its Beam twin,
# tfmet-train-contrastive).
MET_FOLDERS = (
    INFO_DIR,
    Setting("image_root", None, str, "Folder whose images/ subfolder holds the Met images."),
)

# The recogniser export and its Met database, as tfmet-recognize and tfmet-serve open them.
RECOGNIZER = (
    Setting("model", None, str, "Recogniser export directory (tfmet-export --kind recognizer)."),
    Setting("info_dir", None, str, "Met ground truth folder: the answers' database images."),
    Setting("image_root", None, str, "Met image root (default: --info_dir's parent)."),
    MINI,
)

# tfmet-extract's own settings (with MODEL and INPUT: what its --config may set).
EXTRACT = (
    *MET_FOLDERS,
    Setting("output_dir", None, str, "Where chunk files and descriptor stores go."),
    MINI,
    Setting("splits", ["train", "val", "test"], list, "Splits to extract."),
    Setting("queries_only", False, bool, "Extract only the query splits (val, test)."),
    Setting("num_shards", 1, int, "Number of machines sharing the work."),
    Setting("shard_index", 0, int, "This machine's shard, in [0, num_shards)."),
    Setting("batch_images", 1, int, "Up to this many same-size images per model call."),
    Setting("chunk_size", 512, int, "Images per chunk file (the unit of resumption)."),
    Setting("num_parallel_reads", -1, int, "Parallel image decodes (-1: autotune)."),
    Setting(
        "fold_bn",
        True,
        bool,
        "Fold BatchNorms into convolutions (same descriptors to ~1e-7, faster).",
    ),
    Setting(
        "local_features",
        0,
        int,
        "Also keep this many local features per image (spatial verification, "
        "tfmet-knn-eval --rerank=spatial); 0: none.",
    ),
    Setting("local_dim", 128, int, "Dimension of local features (projected when larger)."),
    Setting("keep_chunks", False, bool, "Keep chunk files after merging."),
)


def names(*tables):
    """The setting names of `tables`, in order."""
    return tuple(s.name for table in tables for s in table)


def config(*tables):
    """The defaults of `tables` as a ConfigDict (a None default keeps its type; lists: tuples)."""
    result = ml_collections.ConfigDict()
    for s in (s for table in tables for s in table):
        kind = str if isinstance(s.kind, tuple) else s.kind
        if s.default is None:
            result[s.name] = ml_collections.FieldReference(None, field_type=kind)
        else:
            result[s.name] = tuple(s.default) if kind is list else s.default
    return result


def extract_config():
    """tfmet-extract's settings (and tfmet-extract-beam's shared ones) with their defaults."""
    return config(MODEL, INPUT, EXTRACT)


_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    list: flags.DEFINE_list,
}


def _module(module_name):
    """The name absl lists a module's flags under (`__main__`: `sys.argv[0]`, as absl does)."""
    return sys.argv[0] if module_name == "__main__" else module_name


def define_flags(table, module_name, flag_values=flags.FLAGS):
    """Defines one absl flag per setting of `table`, listed in --help under the module named
    `module_name` (the caller's `__name__`)."""
    where = {"flag_values": flag_values, "module_name": _module(module_name)}
    for s in table:
        if s.short_name:
            where["short_name"] = s.short_name
        else:
            where.pop("short_name", None)
        if isinstance(s.kind, tuple):
            flags.DEFINE_enum(s.name, s.default, list(s.kind), s.help, **where)
        else:
            _DEFINE[s.kind](s.name, s.default, s.help, **where)


def given(name, defaults, file_config, flag_values=flags.FLAGS):
    """Whether the setting `name` was chosen for this run: its flag given, or the config file
    setting it to other than its default in `defaults` (a ConfigDict)."""
    if flag_values[name].present:
        return True
    return file_config is not None and name in file_config and file_config[name] != defaults[name]


def config_help(example):
    """The help of the `--config` of a program whose settings are tables' (`example`: a config
    file, or some of the settings one may hold)."""
    return (
        f"Optional ml_collections config of these settings ({example}); flags given on the "
        "command line override it, as does --config.<key>=<value>."
    )


def resolve(defaults, file_config, program, flag_values=flags.FLAGS):
    """The settings of a run, as a dict: `defaults` (a ConfigDict), then the entries of
    `file_config` (the --config file, or None), then the flags given on the command line.

    Raises:
      UsageError: the config file has an entry that is not one of `defaults`.
    """
    values = defaults.to_dict()
    for key, value in (file_config or {}).items():
        if key not in values:
            raise UsageError(f"config key {key!r} is not a setting of {program}")
        values[key] = value
    for key in values:
        if flag_values[key].present:
            values[key] = flag_values[key].value
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# What a value of each kind is (isinstance), and how an error names it.
_TYPES = {
    str: (str, "a string"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    bool: (bool, "true or false"),
    list: ((list, tuple), "a list"),
}


def check(values, *tables):
    """Raises UsageError naming the first setting of `tables` whose value in `values` (from
    `resolve`: a config file may hold anything) is not of its kind or not one of its choices."""
    for s in (s for table in tables for s in table):
        value = values[s.name]
        if value is None:
            continue
        if isinstance(s.kind, tuple):
            if value not in s.kind:
                choices = ", ".join(s.kind)
                raise UsageError(f"--{s.name} must be one of {choices}. Received: {value!r}")
            continue
        types, what = _TYPES[s.kind]
        if not isinstance(value, types) or (isinstance(value, bool) and s.kind is not bool):
            raise UsageError(f"--{s.name} must be {what}. Received: {value!r}")
