"""A site process for the crash test: trains rounds forever with the real loop on the
tiny model; after each update is recorded it "sends" it by appending its hash to
released.txt. The test kills it at random moments and starts it again."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from client.budget import Policy
from client.site import Site, SiteTrainer
from client.budget import update_digest
from common.data import read_records, site_split
from tests.conftest import LABELS, tiny_config


def main(model_dir: str, site_file: str, test_file: str, state_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    files = {"sites": [Path(site_file)] * 2, "test": Path(test_file)}
    cfg = tiny_config(Path(model_dir), files, federation={"num_rounds": 1000})
    ds = read_records(site_file, "note", "diagnosis", LABELS)
    # no evaluations: 1000 planned noisy evaluations would not fit the run target
    site = Site("site0", site_split(ds, 0.1, 0), LABELS,
                Policy(1000.0, 1e-5, release_evaluation=False), Path(state_dir))
    out = Path(out_dir)
    round_no = len(list(open(out / "released.txt"))) if (out / "released.txt").exists() else 0
    while True:
        round_no += 1
        result = SiteTrainer(cfg, site).fit(round_no, 1000, "crash-run")
        if result["metrics"]["refused"]:  # e.g. "repeat": killed after its entry, before
            continue                      # its "send"; a refusal sends no update
        with open(out / "released.txt", "a") as handle:  # the update leaves the site
            handle.write(update_digest(result["arrays"]) + "\n")
            handle.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
