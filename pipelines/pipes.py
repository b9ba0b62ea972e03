"""The Pipes client that launches the trainer, with a message reader that reads whole lines.

Dagster's file message reader (1.13) hands every ``readline()`` to ``json.loads``. When it
catches the trainer in the middle of writing a large message (the final materialisation, whose
metadata embeds preview images), ``readline()`` returns the part written so far, the JSON does
not parse, the reader thread dies and the run loses the trainer's metadata (seen in CI:
"Unterminated string starting at ..."). This reader keeps a partial line until its newline has
arrived, and drains the file once more after the trainer has exited.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster_pipes import PipesDefaultMessageWriter

if TYPE_CHECKING:
    from dagster._core.pipes.context import PipesMessageHandler

#: Seconds between looks at the message file while the trainer runs.
POLL_S = 0.01


class WholeLineMessageReader(dg.PipesMessageReader):
    """Reads Pipes messages from a temporary file, one complete line at a time."""

    @contextmanager
    def read_messages(self, handler: PipesMessageHandler) -> Iterator[dict[str, Any]]:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "messages")
            open(path, "w", encoding="utf-8").close()
            finished = threading.Event()
            reader = threading.Thread(
                target=self._read, args=(path, handler, finished), daemon=True
            )
            reader.start()
            try:
                yield {
                    PipesDefaultMessageWriter.FILE_PATH_KEY: path,
                    PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY: False,
                }
            finally:
                finished.set()
                reader.join()

    @staticmethod
    def _read(path: str, handler: PipesMessageHandler, finished: threading.Event) -> None:
        pending = ""
        try:
            with open(path, encoding="utf-8") as stream:
                while True:
                    # Checked before reading: once the trainer has exited, this pass reads
                    # everything it wrote, so nothing written just before the end is lost.
                    last_pass = finished.is_set()
                    pending += stream.read()
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        if line.strip():
                            handler.handle_message(json.loads(line))
                    if last_pass:
                        return
                    time.sleep(POLL_S)
        except Exception:
            handler.report_pipes_framework_exception(
                "WholeLineMessageReader reader thread", sys.exc_info()
            )
            raise

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a temporary file (WholeLineMessageReader)."


def pipes_subprocess_client() -> dg.PipesSubprocessClient:
    """The client `train_dcgan` launches the trainer with."""
    return dg.PipesSubprocessClient(message_reader=WholeLineMessageReader())
