"""What every zfkeras tool shares: quiet start, one-line errors, flag records.

A tool calls `common.run(main)`. Flag errors, `zfkeras.errors.Error` and
missing files end the tool with one line on stderr and exit status 1 (2 for
flags); nothing else is printed.
"""

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from zfkeras import quiet
from zfkeras.errors import Error

__all__ = ["Error", "run", "split_list", "tool_flags_as_flagfile"]


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
