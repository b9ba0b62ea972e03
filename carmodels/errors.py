"""Errors a person can fix: bad input, as opposed to bugs.

The library raises these where it knows what is wrong with an input (a manifest without a URL
column, a truncated checkpoint, a shard folder of another schema version, ...). ``str()`` of
each is one line that names the input and the fix, so the CLI prints it as it is and the
Dagster layer turns it into a run failure without a traceback; anything else that escapes is
a bug and keeps its traceback.

All of them are ValueErrors, so callers that caught ``ValueError`` before these classes
existed still catch them. Two also keep the built-in type the library used to raise in their
place (``FileNotFoundError``, ``KeyError``), for the same reason.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input a person can fix; ``str()`` is one line naming the input and the fix."""

    def __str__(self) -> str:
        # KeyError's own __str__ would quote the message (it shows the missing key's repr);
        # every subclass reads as the plain sentence it was given.
        if len(self.args) == 1:
            return str(self.args[0])
        return super().__str__()


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that is not there (typically: the stage before was not run)."""


class MissingColumnError(InputError, KeyError):
    """A table (manifest, raw shard, ...) without a column the stage needs."""


class ManifestError(InputError):
    """A listing manifest that cannot be read or holds nothing to scrape."""


class CheckpointError(InputError):
    """A file that is not a readable carmodels checkpoint (truncated, foreign, other format)."""


class ShardsError(InputError):
    """A shards folder (or raw/unique folder) that cannot be read as one: rebuild it."""


class EmptySplitError(ShardsError):
    """A readable shards folder with no images in the split asked for."""


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with its line breaks and runs of spaces collapsed, cut to ``limit`` characters.

    Messages quote library errors (pandas, pyarrow, torch) whose text can span lines or run to
    a paragraph, and an error must stay one readable line.
    """
    line = " ".join(str(text).split())
    if limit is not None and len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line
