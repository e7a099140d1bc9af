"""What every tfmet program shares: one UsageError, one way to fail, one way to run `main`.

The flag idiom of every program: flags are defined at module top with `flags.DEFINE_*` and read
through the module's `FLAGS`; required flags are checked with `require` (one error line naming
them), not with absl's `mark_flags_as_required` (which prints the whole usage text).

A program ends in one of three ways:
- success, exit status 0;
- bad input, exit status 2 and one line on stderr, `<program>: error: <message>`: a `UsageError`
  raised by the program, a bad-input error raised by the library (`BAD_INPUT`), a flag or
  `--config` file that cannot be parsed or loaded, or an OS error about a path the user gave (an
  output path that is a folder, a folder that is a file, no permission);
- failure at run time, exit status 1: a full disk or an I/O error (one line, `RUNTIME_ERRNOS`),
  a `RunFailure` (one line: e.g. a model whose outputs are not finite), or a bug (its traceback).
Set TFMET_TRACEBACK=1 to see the traceback behind any one-line error.

`--help` / `-h` print what the program does (its module docstring) and its own flags (those of
tfmet's modules) and exit 0; `--helpfull` adds absl's flags after them. Both are answered before
anything heavy is imported: a program's module imports TensorFlow only inside its `main`.
"""

import errno
import gc
import os
import sys

from absl import app, flags, logging

from tfmet.io.safe_pickle import UnsafePickleError

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad command-line input: the message is one line naming the flag or file."""


class RunFailure(RuntimeError):
    """A failure at run time that is not a bug (exit status 1, one line naming the cause)."""


# The library's errors for bad input: each names the file or parameter and the problem.
BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, UnsafePickleError)

# OS errors that are the machine's, not the input's: the run failed (exit status 1).
RUNTIME_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM})


def _one_line(message):
    return " ".join(str(message).split())


def _traceback_wanted():
    return os.environ.get("TFMET_TRACEBACK", "") not in ("", "0")


def report_skipped(program, path, reason):
    """One line `<program>: skipped <path>: <reason>` on stderr for an input that cannot be
    answered. The programs that take many inputs (tfmet-recognize, tfmet-predict) answer the
    others and then exit with status 2 (`EXIT_BAD_INPUT`) if anything was skipped."""
    print(f"{program}: skipped {path}: {_one_line(reason)}", file=sys.stderr)


def fail(program, message, status=EXIT_BAD_INPUT):
    """One line `<program>: error: <message>` on stderr, then exit `status` (bad input: 2)."""
    print(f"{program}: error: {_one_line(message)}", file=sys.stderr)
    sys.exit(status)


def os_error_message(error):
    """`<file>: <what went wrong>` for an OSError (its strerror, both paths of a rename)."""
    what = error.strerror or str(error)
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    return f"{' -> '.join(map(os.fsdecode, paths))}: {what}" if paths else what


def require(values, *names):
    """Raises UsageError naming every flag in `names` whose value in `values` is unset."""
    missing = [f"--{name}" for name in names if values.get(name) in (None, "")]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")


def check_outputs(folders=(), files=(), values=None):
    """Checks, before any work, that the output flags named in `folders` / `files` (those set)
    can be written: a result computed for an hour is not lost to an output path that is a folder
    (or a file where a folder is wanted). Raises ValueError naming the flag. `values`: the run's
    settings (a dict, e.g. with a --config file's), else the flags."""
    from tfmet.io.outputs import check_output_dir, check_output_file

    for names, check in ((folders, check_output_dir), (files, check_output_file)):
        for name in names:
            value = flags.FLAGS[name].value if values is None else values[name]
            if value:
                check(value, f"--{name}")


def check_strategy(name):
    """Raises UsageError unless `name` is a tf.distribute strategy tfmet knows and its
    environment is there (multi_worker: TF_CONFIG); loads no TensorFlow."""
    from tfmet.training import distribute

    try:
        distribute.check_environment(name)
    except ValueError as e:
        raise UsageError(f"--strategy: {e}") from None
    return name


def no_arguments(argv):
    """Raises UsageError when positional arguments follow the program name."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def guarded(program, main):
    """`main` with bad input and known run-time failures turned into `fail(program, ...)`."""

    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:
            status = _status(e)
            if status is None or _traceback_wanted():
                raise
            fail(program, _message(e), status)

    return wrapped


def _status(error):
    """The exit status of an exception that leaves as one line, or None (a bug: traceback)."""
    if isinstance(error, OSError) and error.errno in RUNTIME_ERRNOS:
        return EXIT_FAILURE
    if isinstance(error, RunFailure):
        return EXIT_FAILURE
    if isinstance(error, BAD_INPUT) or (isinstance(error, OSError) and error.filename):
        return EXIT_BAD_INPUT
    return None


def _message(error):
    if isinstance(error, OSError) and error.filename:
        return os_error_message(error)
    return str(error)


def config_flag_names():
    """Names of the program's ml_collections `--config`-style flags."""
    from ml_collections.config_flags.config_flags import is_config_flag

    return [name for name, flag in flags.FLAGS._flags().items() if is_config_flag(flag)]


HELP_ARGS = frozenset({"--help", "-help", "-h", "--helpshort", "-helpshort", "-?"})
HELPFULL_ARGS = frozenset({"--helpfull", "-helpfull"})


def _help_wanted(argv):
    """`short` for --help/-h, `full` for --helpfull, None otherwise (arguments after `--` are
    positional, never help)."""
    for arg in argv[1:]:
        if arg == "--":
            return None
        if arg in HELPFULL_ARGS:
            return "full"
        if arg in HELP_ARGS:
            return "short"
    return None


def _flag_line(flag):
    dashes = "-" if len(flag.name) == 1 else "--"  # -k, -t: as the docs write them
    names = f"{dashes}{'[no]' if flag.boolean else ''}{flag.name}"
    if flag.short_name:
        names = f"-{flag.short_name}, {names}"
    default = flag.default_as_str if flag.default is not None else None
    if flag.boolean:
        default = "true" if flag.default else "false"
    text = " ".join(str(flag.help).split())  # absl puts an enum's values first: <a|b>: ...
    if default not in (None, "", "''"):
        text += f" (default: {default.strip(chr(39))})"
    return f"  {names}  {text}"


def help_text(program, module, full=False):
    """What `--help` prints: the docstring of the program's `module` (what it does, how it is
    called), then its own flags, then those it shares (tfmet's flag modules, e.g. model_flags);
    with `full`, absl's flags after them."""
    by_module = flags.FLAGS.flags_by_module_dict()
    # Run as `python -m`, the module is __main__ and absl names its flags after sys.argv[0].
    key = module if module in by_module else (sys.argv[0] if sys.argv else module)
    shared = sorted(m for m in by_module if m.startswith("tfmet") and m != key)
    doc = getattr(sys.modules.get(module), "__doc__", None) or program
    lines = [line.rstrip() for line in doc.strip("\n").splitlines()]
    for name in ([key] if key in by_module else []) + shared:
        lines += ["", "Flags:" if name == key else f"Flags shared with other programs ({name}):"]
        lines += [_flag_line(f) for f in sorted(by_module[name], key=lambda f: f.name)]
    if full:
        for name in sorted(set(by_module) - {key, *shared}):
            lines += ["", f"Flags of {name}:"]
            lines += [_flag_line(f) for f in sorted(by_module[name], key=lambda f: f.name)]
    else:
        lines += ["", f"`{program} --helpfull` also lists absl's flags (logging, verbosity, ...)."]
    return "\n".join(lines) + "\n"


def parse_flags(program, known_only=False, module="__main__"):
    """An `app.run` flags parser: a flag or `--config` file that cannot be parsed is one line
    naming it, exit status 2 (absl would print a traceback for a config file that raises, or a
    multi-line message and exit status 1). `known_only` leaves unknown flags in the returned
    arguments (for programs that pass them on, e.g. to Beam). `--help`, `-h` and `--helpfull`
    print `help_text(program, module)` (`module`: the program's) and exit 0."""

    def parser(argv):
        wanted = _help_wanted(argv)
        if wanted:
            sys.stdout.write(help_text(program, module, full=wanted == "full"))
            sys.exit(0)
        absl_logger = logging.get_absl_logger()
        absl_logger.addFilter(_errors_only)  # ml_collections warns before its error: one line
        try:
            return _parse(program, argv, known_only)
        finally:
            absl_logger.removeFilter(_errors_only)

    return parser


def _errors_only(record):
    return record.levelno >= 40  # the standard library's ERROR (absl numbers levels its own way)


def _parse(program, argv, known_only):
    try:
        args = flags.FLAGS(argv, known_only=known_only)
    except Exception as e:
        if _traceback_wanted():
            raise
        fail(program, _flag_error(e, argv))
    for name in config_flag_names():
        flag = flags.FLAGS[name]
        where = f"--{name}={_config_file(name, argv)}"
        if type(flag.value).__name__ == "_ErrorConfig":  # ml_collections defers the error
            error = object.__getattribute__(flag.value, "_error")
            fail(program, f"{where}: cannot load the config file ({_last_line(error)})")
        if flag.present and flag.value is None:
            fail(program, f"{where}: get_config() returned None, not a config")
        if flag.present and not _is_config(flag.value):
            returned = type(flag.value).__name__
            fail(program, f"{where}: get_config() returned {returned}, not a ConfigDict")
    return args


def _is_config(value):
    """Whether `value` is what the programs read a config as (an ml_collections ConfigDict)."""
    from ml_collections import ConfigDict

    return isinstance(value, ConfigDict)


def _config_file(name, argv):
    """The value of `--<name>` on the command line (the config file and variant)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _flag_error(error, argv):
    """One line for a flag that failed to parse: absl's message, or the config file's error."""
    if isinstance(error, flags.Error):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = lines[0].removeprefix("flag ")
        # A config file that raised: absl embeds its traceback; keep the exception's line.
        return first if len(lines) == 1 else f"{first} {lines[-1]}"
    names = config_flag_names()
    where = f"--{names[0]}={_config_file(names[0], argv)}" if names else "flags"
    if isinstance(error, SyntaxError) and error.lineno is None:  # e.g. null bytes: no line
        return f"{where}: syntax error: {error.msg}"
    if isinstance(error, SyntaxError):
        return f"{where}: syntax error in {error.filename} line {error.lineno}: {error.msg}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"{where}: the config file defines no get_config()"
    if isinstance(error, AttributeError | KeyError) and not _raised_in_config(error):
        key = str(error).strip("\"'")
        prefixes = tuple(f"--{name}." for name in names)
        overrides = [a.split("=", 1)[0] for a in argv if prefixes and a.startswith(prefixes)]
        named = [o for o in overrides if o.rsplit(".", 1)[-1] == key]
        return f"{named[0] if named else where}: the config has no key {key!r}"
    return f"{where}: loading the config failed: {type(error).__name__}: {error}"


def _last_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _raised_in_config(error):
    """Whether `error` was raised by the code of a config file (not by ml_collections)."""
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and "ml_collections" not in last


def run_program(program, main, known_only=False, defaults=None):
    """`app.run` of `guarded(program, main)` with `parse_flags`: a program's entry point. Its
    `--help` is the docstring of `main`'s module. `defaults` ({flag name: value}) are this
    program's own defaults of shared flags (e.g. tfmet-demo's --backbone), set before parsing
    (so `--help` shows them); only the program that runs sets them."""
    for name, value in (defaults or {}).items():
        flags.FLAGS.set_default(name, value)
    parser = parse_flags(program, known_only=known_only, module=main.__module__)
    try:
        app.run(guarded(program, main), flags_parser=parser)
    finally:
        freeze_for_exit()


def freeze_for_exit():
    """Collects the program's garbage once (finalizers run as usual), then freezes what is left
    (`gc.freeze`), so the interpreter's shutdown does not walk the objects again in its own
    collections (`import tensorflow` alone leaves ~330,000 tracked objects).

    Measured by tools/bench_exit.py (medians of 5, one run, 2-core EPYC): `import tensorflow`
    alone 4.54 -> 3.66 s, tfmet-export of EfficientNet-Lite0 10.85 -> 10.27 s, i.e. 0.6-0.9 s
    off every program that loaded TensorFlow. atexit handlers, the flushing of stdout/stderr
    and every object freed by reference count at shutdown are unchanged. What changes: an
    object still in a reference cycle at exit is not finalized at shutdown, so nothing may rely
    on that; tfmet closes its files and TensorBoard writers itself.
    """
    gc.collect()
    gc.freeze()
