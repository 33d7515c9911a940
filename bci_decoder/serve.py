"""``bci-decoder serve``: the daemon's start-up, and the console script's entry point.

Start to ready (process start to the first ``GET /health`` that answers, i.e. the daemon
built in the app's ``lifespan``) is almost all import time. Measured by CPU time on this
machine: FastAPI (with pydantic, starlette and OpenTelemetry) 0.40 s, numpy 0.15 s, the
interpreter, uvicorn, yaml and our modules about 0.15 s. What is not needed to serve
stays out of it:

- The ``bci-decoder`` script enters here. ``serve`` with options this parser takes runs
  without typer and the other commands' module (``cli.py``, 50-100 ms); anything else
  (another command, ``--help``, an option spelled wrong) goes to ``cli.app``, which owns
  the documented interface and its messages (tests/test_serve_startup.py holds the two
  option sets equal). The children the daemon spawns re-run the script as their
  ``__main__``, so they import this module and not typer either.
- Modules the serving path needs only on some requests or configs (the recorder and
  h5py, NWB, plotting, torch in the calibration child) are imported where they are used;
  tests/test_serve_startup.py starts the daemon and checks none is loaded when it is
  ready. The upload parsing worker is spawned after start-up (``api/app.py``).
- Tried and left out: the garbage collector off during the imports saved about 60 ms
  there, and the first collection after it (of every object they left) gave it back:
  start to ready no better within the noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path("configs/serve.yaml")


class ServeError(Exception):
    """The daemon cannot start; the message says what to fix (exit code 2)."""


def run(
    config: Path | None = None,
    model: str | None = None,
    port: int | None = None,
    cadence: float | None = None,
    autostart: bool | None = None,
) -> None:
    """Load the config, build the daemon and serve until SIGINT/SIGTERM."""
    import yaml

    from bci_decoder.runtime.processes import bind_port

    if config is None and not DEFAULT_CONFIG.exists():
        raise ServeError(
            f"no config: {DEFAULT_CONFIG} is not in {Path.cwd()}; pass --config FILE (the "
            "repository's configs/serve.yaml is a template)"
        )
    path = config or DEFAULT_CONFIG
    overrides: dict = {}
    for key, value in (("model", model), ("api.port", port), ("cadence_hz", cadence),
                       ("autostart", autostart)):  # fmt: skip
        if value is not None:
            overrides[key] = value
    if not path.exists():
        raise ServeError(f"no config file at {path}")
    # the port first (from the YAML alone, before the model loads): busy, it is reported
    # at once instead of after the start-up
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        api_raw = raw.get("api") if isinstance(raw, dict) else None
        api_raw = api_raw if isinstance(api_raw, dict) else {}
        peek = (
            str(api_raw.get("host", "127.0.0.1")),
            int(api_raw.get("port", 8765) if port is None else port),
        )
        sock = bind_port(*peek)
    except OSError as e:
        raise ServeError(str(e)) from None
    except (ValueError, TypeError, yaml.YAMLError):
        sock = None  # the full load below says what is wrong
    import uvicorn

    from bci_decoder.api.app import create_app
    from bci_decoder.runtime.daemon import Daemon, DaemonError
    from bci_decoder.serve_config import load_serve_config

    try:
        cfg = load_serve_config(path, overrides)
        if sock is None or peek != (cfg.api.host, cfg.api.port):
            if sock is not None:
                sock.close()
            sock = bind_port(cfg.api.host, cfg.api.port)
        daemon = Daemon(cfg)
        api = create_app(cfg, daemon)
    except (FileNotFoundError, ValueError, DaemonError, OSError) as e:
        raise ServeError(str(e)) from None
    print(
        f"bci-decoder serve: model {cfg.model}, {cfg.cadence_hz:g} Hz, REST on "
        f"http://{cfg.api.host}:{sock.getsockname()[1]} (docs at /docs)",
        flush=True,
    )
    # (not with onnx_threads > 1: ONNX Runtime's pool threads spin between runs, and a
    # spinning real-time thread would keep a core from everything else on the machine)
    if cfg.realtime_priority and cfg.realtime_support_offset and cfg.onnx_threads == 1:
        from bci_decoder.runtime.priority import support_priority

        daemon.raise_support_threads(
            support_priority(cfg.realtime_priority, cfg.realtime_support_offset)
        )
    server = uvicorn.Server(uvicorn_config(api))
    server.run(sockets=[sock])


def http_protocol() -> str:
    """The HTTP parser uvicorn runs: httptools (C, llhttp), a core dependency.

    The server's thread shares the GIL with the decode loop, and h11 (pure Python, what
    uvicorn's ``http="auto"`` silently falls back to) holds it for every byte it parses:
    a 300 MB chunked upload is refused only once 32 MB have passed the parser, and each
    monitoring page's send goes through it (see ``api/routes/page.py``). Missing (an
    install with ``--no-deps``, or a platform pip could not build it on) the daemon still
    serves on h11, and says so.
    """
    try:
        import httptools  # noqa: F401
    except ImportError:
        print(
            "bci-decoder serve: warning: httptools is not installed, so uvicorn parses HTTP "
            "in pure Python (h11), on the GIL the decode loop needs; "
            "`pip install httptools` (a core dependency of bci_decoder)",
            file=sys.stderr,
            flush=True,
        )
        return "h11"
    return "httptools"


def uvicorn_config(app, **kw):
    """The daemon's ``uvicorn.Config`` (tests/daemon_harness.py serves with it too)."""
    import uvicorn

    # no route is a websocket: ws="none" spares uvicorn looking for a websocket library
    kw = {"log_level": "warning", "ws": "none", "http": http_protocol()} | kw
    return uvicorn.Config(app, **kw)


class _NotOurs(Exception):
    """A command line for typer to answer (help, or an error message)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # typer says what is wrong, not us
        raise _NotOurs


def serve_parser() -> argparse.ArgumentParser:
    """``serve``'s options, as ``cli.serve`` declares them (help lives there)."""
    p = _Parser(prog="bci-decoder serve", add_help=False, allow_abbrev=False)
    p.add_argument("--config", type=Path)
    p.add_argument("--model")
    p.add_argument("--port", type=int)
    p.add_argument("--cadence", type=float)
    p.add_argument("--autostart", action=argparse.BooleanOptionalAction)
    return p


def parse_serve(args: list[str]) -> dict | None:
    """The options after ``serve``, or None where typer should answer instead."""
    try:
        return vars(serve_parser().parse_args(args))
    except _NotOurs:
        return None


def main(argv: list[str] | None = None) -> int | None:
    """The ``bci-decoder`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    opts = parse_serve(args[1:]) if args[:1] == ["serve"] else None
    if opts is None:
        from bci_decoder.cli import app

        return app(args=args, prog_name="bci-decoder")
    try:
        run(**opts)
    except ServeError as e:
        red = ("\x1b[31m", "\x1b[0m") if sys.stderr.isatty() else ("", "")
        print(f"{red[0]}error: {e}{red[1]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
