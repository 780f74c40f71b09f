"""User errors: one clear line naming the bad value and what is allowed, and the one place a command line turns
them into a non-zero exit (never a traceback)."""

from __future__ import annotations

import argparse


class UserError(ValueError):
    """A bad value or input from the user, with a one-line message saying what was wrong and what is allowed.

    An ordinary exception: library code raises it and callers may catch it. Only the command lines turn it into
    ``error: <message>`` on stderr and exit status 1 (:func:`cli_errors`), so a notebook never sees ``SystemExit``.
    """


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def cli_errors(main):
    """Decorate a command line's ``main``: a :class:`UserError` (or another ``ValueError`` subclass listed by the
    library as a user-facing error, see ``USER_ERRORS``) becomes ``SystemExit("error: ...")``, one line, status 1;
    so does a full disk or quota (:func:`disk_full_message`), wherever the write that hit it was. Ctrl-C is one line
    too, status 130 (every output is written whole under a temporary name, so nothing half-written is left)."""
    import functools

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            message = str(e).removeprefix("error: ")
            raise SystemExit(f"error: {message}") from None
        except OSError as e:
            message = disk_full_message(e)
            if message is None:
                raise
            raise SystemExit(f"error: {message}") from None
        except KeyboardInterrupt:
            import sys

            print("interrupted: what was finished is kept, written whole; rerun the same command to reuse it",
                  file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def disk_full_message(error: OSError) -> str | None:
    """The one line for an ``OSError`` that says the disk or the user's quota is full, else None (every other
    ``OSError`` stays a traceback: it may be a bug)."""
    import errno

    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" writing {error.filename}" if error.filename else ""
    return f"no space left on device{where} ({error.strerror or 'disk full'}): free some space and rerun the same command"


# Exceptions whose message is meant for the user as it stands. Library modules append their own error classes
# (e.g. target, top-k and checkpoint errors) with ``register_user_error``.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


def register_user_error(cls: type[BaseException]) -> type[BaseException]:
    """Class decorator: :func:`cli_errors` reports ``cls`` as a one-line error instead of a traceback."""
    global USER_ERRORS
    if cls not in USER_ERRORS:
        USER_ERRORS = USER_ERRORS + (cls,)
    return cls
