"""Where facts live: retention curves, logit lens, layer reversion, manipulation probes."""
