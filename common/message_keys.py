"""Record keys shared by client and server: written once, read on both sides.

What a site may send under each key, and by which mechanism, is declared in
client/releases.py; nothing else leaves a site."""


class Keys:
    # FitIns / EvaluateIns config (server -> site)
    ROUND = "round"
    NUM_ROUNDS = "num_rounds"
    RUN_ID = "run_id"
    # FitRes / EvaluateRes metrics (site -> server)
    SITE = "site"
    PRIVATE = "private"
    REFUSED = "refused"          # "" when the site trained, else a refusal code
    EPSILON = "epsilon"          # cumulative ε of the site's dataset after this reply
    DELTA = "delta"
    NOISE_MULTIPLIER = "noise_multiplier"
    SAMPLE_RATE = "sample_rate"
    STEPS = "steps"
    MAX_GRAD_NORM = "max_grad_norm"
    BYTES_SENT = "bytes_sent"
    LEDGER = "ledger"                  # the site's signed privacy ledger (JSONL text)
    LEDGER_HEAD = "ledger_head"        # "seq:hash" of the ledger's last entry at this reply
    SITE_PUBLIC_KEY = "site_public_key"
    SECURE_AGGREGATION = "secure_aggregation"
    EVALUATED = "evaluated"            # False: the site keeps its evaluation to itself
    PERSONALIZED_ADAPTER = "personalized_adapter"    # True: the site saved its own copy
    PERSONALIZED_REFUSED = "personalized_refused"
    ERROR = "error"                    # a failure code; the details stay in the site's log
    ERROR_REF = "error_ref"            # where the site's own log holds the details
