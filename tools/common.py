"""What every zfkeras tool shares: quiet start, one-line errors, flag records.

A tool calls `common.run(main)`. Flag errors, `zfkeras.errors.Error` and
missing files end the tool with one line on stderr and exit status 1 (2 for
flags); nothing else is printed.
"""

import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

from zfkeras import quiet
from zfkeras.errors import Error

__all__ = [
    "Error",
    "batch_progress",
    "define_maps_flag",
    "layer_maps",
    "progress",
    "run",
    "split_list",
    "tool_flags_as_flagfile",
]


def _tool_name():
    return os.path.splitext(os.path.basename(sys.argv[0]))[0] or "zfkeras"


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"{_tool_name()}: error: {e}\n")
        sys.exit(2)


def _quiet_datasets():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()


def run(main):
    """Runs `main(argv)` under absl with quiet TensorFlow and short errors."""
    quiet.import_tensorflow()

    def guarded(argv):
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        _quiet_datasets()
        try:
            return main(argv)
        except Error as e:
            message = str(e)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            message = f"{e.filename}: {e.strerror}" if e.filename else str(e)
        except KeyboardInterrupt:
            message = "interrupted"
        sys.stderr.write(f"{_tool_name()}: error: {message}\n")
        sys.exit(1)

    app.run(guarded, flags_parser=_parse_flags)


def tool_flags_as_flagfile(module_name):
    """The tool's own flags as a re-loadable flagfile (one --flag=value a line)."""
    if module_name == "__main__":
        module_name = sys.argv[0]
    lines = []
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        if flag.name == "flagfile":
            continue
        lines.append(flag.serialize())
    return "\n".join(line for line in lines if line) + "\n"


def split_list(value):
    """'a,b, c' -> ['a', 'b', 'c'] (empty items dropped)."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def paths(values):
    """Repeated and comma-separated flag values as one tuple."""
    return tuple(p for v in values or () for p in split_list(str(v)))


def register_one_per(labels_flag, paths_flag, plural, note=""):
    """Validates that --LABELS_FLAG has one entry per path of --PATHS_FLAG.

    `plural` names the paths in the message ("files"); `note` is appended to
    the mismatch message.
    """

    def check(values):
        given = len(values[labels_flag] or ())
        count = len(paths(values[paths_flag]))
        if not given:
            return True
        if not count:
            raise flags.ValidationError(f"--{labels_flag} needs --{paths_flag} {plural}.")
        if given != count:
            raise flags.ValidationError(
                f"Give one --{labels_flag} entry per --{paths_flag} path "
                f"({count} {plural}, {given} labels){note}."
            )
        return True

    flags.register_multi_flags_validator([paths_flag, labels_flag], check)


def progress(message):
    """One progress line on stderr, prefixed with the tool's name."""
    print(f"{_tool_name()}: {message}", file=sys.stderr, flush=True)


def batch_progress(what, every=20):
    """A `progress(done, total[, label])` callback printing every `every` batches."""

    def report(done, total, label=None):
        if done == 1 or done % every == 0 or done == total:
            progress(f"{label or what}: {done}/{total or '?'} batches")

    return report


_LAYER_MAPS = re.compile(r"^\s*([\w.-]+)\s*:\s*(\d+(?:\s*,\s*\d+)*)\s*$")


def define_maps_flag(help_text):
    """A repeatable --maps=LAYER:c1,c2 flag with its validator."""
    holder = flags.DEFINE_multi_string("maps", [], help_text)
    flags.register_validator(
        "maps",
        lambda values: all(_LAYER_MAPS.match(v) for v in values),
        "--maps takes LAYER:c1,c2,... with non-negative integers.",
    )
    return holder


def layer_maps(values):
    """['conv5:1,2'] -> (('conv5', (1, 2)),)."""
    pairs = [_LAYER_MAPS.match(value).groups() for value in values]
    return tuple((layer, tuple(int(c) for c in split_list(cs))) for layer, cs in pairs)
