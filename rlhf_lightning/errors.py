"""User errors, and the one line the ``rlhf`` command reports each as: ``rlhf: error: <message>``, exit status 2.

A user error is a mistake in what the user gave — a setting, a data file, a checkpoint, a path — as opposed to a
defect of the package. The messages raised for them already name the file/line/field or the setting; the command
prints that message alone, since a traceback through Lightning and jsonargparse only hides it (``--debug`` shows
the traceback). :data:`USER_ERRORS` are the exception types that carry such messages.
"""

from __future__ import annotations

import argparse
import re

import yaml

#: Exceptions reported as one line: bad values and settings (ValueError, and with it the data layer's DataError and
#: jsonargparse's ArgumentError), paths (OSError: missing, existing, a file where a folder belongs), YAML syntax.
#: Anything else (TypeError, RuntimeError, ...) is a defect and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, yaml.YAMLError, argparse.ArgumentError)

#: Exit status of a user error (argparse's for a usage error).
EXIT_USER_ERROR = 2


class UsageError(ValueError):
    """A command-line mistake of one of rlhf's own commands (a flag, a path that is not there)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise :class:`UsageError` instead of printing the usage and exiting, so that ``rlhf``
    reports them in its one line like every other user error (``--help`` still prints the usage)."""

    def error(self, message: str):  # argparse's signature: NoReturn, no exception argument
        raise UsageError(f"{self.prog.removeprefix('rlhf ')}: {message}")


# Lines of jsonargparse's nested Union reports that say nothing about the mistake: the subtypes tried, the value
# echoed back (a whole config as a Namespace), and the failed match against None every optional setting has.
_NOISE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:$|Given value|"
    r"Expected a <class 'NoneType'>)"
)


def condense(message: str) -> str:
    """jsonargparse's report of a config mistake — a tree of Union alternatives tried, each with its value echoed
    back — as one line: the setting's full dotted name and what is wrong with it.

    ``Parser key "model"`` / ``Problem with given class_path 'X'`` / ``Option 'lr_x' is not accepted`` becomes
    ``model.init_args.lr_x: not a setting of X``; a value of the wrong type keeps jsonargparse's own words
    (``trainer.max_steps: Expected a <class 'int'>. Got value: ten``); a message without that structure (one of our
    own, raised from a module's ``__init__``) comes back as its first informative line.
    """
    path: list[str] = []
    owner = None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if key := re.fullmatch(r'Parser key "(.+)":', line):
            path.append(key[1])
        elif cls := re.fullmatch(r"Problem with given class_path '(.+)':", line):
            owner = cls[1]
            if len(path) == 1:  # model / data, given as class_path + init_args; nested groups take plain keys
                path.append("init_args")
        elif line and not _NOISE.match(line):
            if option := re.fullmatch(r"Option '(.+)' is not accepted", line):
                return f"{'.'.join([*path, option[1]])}: not a setting of {owner}"
            return f"{'.'.join(path)}: {line}" if path else line
    return " ".join(message.split())


def user_message(err: BaseException) -> str:
    """The one line that reports ``err`` (one of :data:`USER_ERRORS`)."""
    if isinstance(err, OSError) and err.strerror and str(err).startswith("[Errno"):
        # A bare OSError reads "[Errno 17] File exists: 'run'": say it without the errno.
        return f"{err.filename}: {err.strerror.lower()}" if err.filename is not None else err.strerror
    return condense(str(err))
