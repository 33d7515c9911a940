"""REST control of the daemon (FastAPI): status, start/stop, model, calibrations."""
