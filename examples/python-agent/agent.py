"""A Python agent on the in-process SDK: a JSON inventory of a directory tree.

    BAQUP_SOURCE_PATH=/data python examples/python-agent/agent.py

The `Agent` runs the same lifecycle, heartbeat thread, bus, events, staging and
manifest as baqup-run; this file only does the work and reports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from baqup_supervisor.agent import Agent, run
from baqup_supervisor.walker import Walker


def main(agent: Agent) -> None:
    source = agent["BAQUP_SOURCE_PATH"]
    agent.intent("inventory", expected_seconds=60, detail=source)
    walker = Walker(
        source,
        policy=agent["BAQUP_SOURCE_FOLLOW_SYMLINKS"],
        exclude=agent["BAQUP_SOURCE_EXCLUDE"] or (),
        max_files=agent["BAQUP_SOURCE_MAX_FILES"],
        on_event=lambda code, severity, message, path: agent.event(
            code, severity=severity, message=message, path=path
        ),
    )
    path = agent.artifact_path("inventory.jsonl")
    with path.open("w") as out:
        for entry in walker:
            out.write(
                json.dumps({"path": entry.relative, "kind": entry.kind, "size": entry.size}) + "\n"
            )
            if walker.stats.files % 1000 == 0:
                agent.progress(files=walker.stats.files, bytes=walker.stats.bytes)
    agent.intent(None)
    agent.progress(100, files=walker.stats.files, bytes=walker.stats.bytes)
    agent.metadata(
        type="inventory",
        path=source,
        files_included=walker.stats.files,
        files_excluded=walker.stats.excluded,
    )
    agent.log.info("inventory written", files=walker.stats.files)


if __name__ == "__main__":
    raise SystemExit(run(main, schema=str(Path(__file__).with_name("agent-schema.json"))))
