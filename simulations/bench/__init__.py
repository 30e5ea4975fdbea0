"""fedcare's benchmark: what the product reaches and what it costs, measured with the
product's own functions and written to one folder.

    python -m simulations.bench [--quick] [--only utility,accounting] [--device auto]
                                [--out runs/bench-<timestamp>]

Sections (each a function of a `Bench`, each runnable alone with --only):

    utility          test accuracy / macro-F1 at equal compute: pooled, federated, DP ε ∈ {1,3,8},
                     DP ε=8 with a server optimiser; gaps against the targets
    dp-cost          time and peak memory of one DP-SGD step vs one plain step
    bytes            bytes a site sends per round vs the full fp32 model
    accounting       the claimed ε (PRV) vs dp-accounting's PLD and RDP over a grid
    orchestration    share of a round's wall time not spent in the slowest site's training
    scaling          4 -> 16 -> 64 simulated hospitals on Flower's Ray simulation
    personalization  per-site global vs personalised model under strong skew
    robustness       1 of 5 sites poisoned: the mean vs the median and multi-Krum

The folder holds results.json (every figure), results.md (the tables, headed by the
machine) and one PNG + SVG plot per section. docs/benchmarks.md explains how to read them.
"""
