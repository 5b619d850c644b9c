"""Where facts live: logit lens, layer reversion, manipulation probes. `analyze.py` runs them
over a run directory, beside the retention curves that training recorded (train/retention.py)."""
