"""Record keys shared by client and server: written once, read on both sides."""


class Keys:
    # FitIns / EvaluateIns config (server -> site)
    ROUND = "round"
    NUM_ROUNDS = "num_rounds"
    RUN_ID = "run_id"
    # FitRes / EvaluateRes metrics (site -> server)
    SITE = "site"
    PRIVATE = "private"
    REFUSED = "refused"          # "" when the site trained, else the reason
    TRAIN_LOSS = "train_loss"
    EPSILON = "epsilon"          # cumulative ε of the site's data after this round
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise_multiplier"
    SAMPLE_RATE = "sample_rate"
    STEPS = "steps"
    MAX_GRAD_NORM = "max_grad_norm"
    BYTES_SENT = "bytes_sent"
    TRAIN_SECONDS = "train_seconds"
    LEDGER = "ledger"                  # the site's signed privacy ledger (JSONL text)
    SITE_PUBLIC_KEY = "site_public_key"
    SECURE_AGGREGATION = "secure_aggregation"
    PERSONALIZED_ADAPTER = "personalized_adapter"    # where the site saved its own copy
    PERSONALIZED_REFUSED = "personalized_refused"
