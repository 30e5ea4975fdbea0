"""A site's last answer per phase, kept so that a question asked twice costs nothing.

A server that was killed and resumed asks again for the round it had not checkpointed.
Training again would be a second release, charged to the site's budget a second time,
and a run that was never killed would not have paid it. Sending the same bytes again
releases nothing new (it is the same output of the same mechanism), so the site keeps
its last reply of each phase, per run, in its state folder, and answers a repeated
(run, round) with it.

A reply released under SecAgg+ (seen by the server only inside a sum) is never re-sent
in the clear: then the site answers afresh, under its own policy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from common.names import check_name

FOLDER = "replies"


class ReplyStore:
    def __init__(self, state_dir: Path, run_id: str) -> None:
        self.folder = Path(state_dir) / FOLDER / check_name("run id", run_id)

    def _path(self, phase: str) -> Path:
        return self.folder / f"{phase}.safetensors"

    def get(self, phase: str, round_no: int, secure: bool) -> dict | None:
        """The reply kept for (`phase`, `round_no`) when it may be sent as asked now."""
        path = self._path(phase)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            meta = json.loads((handle.metadata() or {}).get("reply", "{}"))
        if meta.get("round") != round_no or (meta.get("secure") and not secure):
            return None
        tensors = load_file(str(path))
        return {"arrays": [tensors[str(i)] for i in range(len(tensors))],
                "num_examples": meta["num_examples"], "metrics": meta["metrics"],
                "loss": meta.get("loss")}

    def put(self, phase: str, round_no: int, secure: bool, reply: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"round": round_no, "secure": secure, "num_examples": reply["num_examples"],
                "metrics": reply["metrics"], "loss": reply.get("loss")}
        partial = self._path(phase).with_suffix(".partial")
        save_file({str(i): np.ascontiguousarray(a) for i, a in enumerate(reply.get("arrays", []))},
                  str(partial), metadata={"reply": json.dumps(meta)})
        partial.replace(self._path(phase))  # whole or absent
