"""The trainer's Pipes messages are read a whole line at a time, however they are written."""

from __future__ import annotations

import json
import time

from dagster_pipes import PipesDefaultMessageWriter

from pipelines.pipes import POLL_S, WholeLineMessageReader


class _Handler:
    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.errors: list[object] = []

    def handle_message(self, message: dict) -> None:
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin: str, exc_info: object) -> None:
        self.errors.append(exc_info)


def test_a_message_written_in_pieces_is_read_once_complete() -> None:
    handler = _Handler()
    big = {"method": "report_asset_materialization", "params": {"preview": "x" * 200_000}}
    line = json.dumps(big) + "\n"
    with WholeLineMessageReader().read_messages(handler) as params:  # type: ignore[arg-type]
        path = params[PipesDefaultMessageWriter.FILE_PATH_KEY]
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"method": "opened"}) + "\n")
            for start in range(0, len(line), 50_000):
                out.write(line[start : start + 50_000])
                out.flush()
                time.sleep(5 * POLL_S)  # the reader sees each piece on its own
        # Written just before the end: still read.
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"method": "closed"}) + "\n")
    assert handler.errors == []
    assert [m["method"] for m in handler.messages] == [
        "opened",
        "report_asset_materialization",
        "closed",
    ]
    assert handler.messages[1] == big
