"""`routescope dashboard RUN [RUN ...] [--host 127.0.0.1] [--port 8050]`.

routescope/cli.py registers `add_dashboard_arguments` and `dashboard_command`. Every run is
checked before the server starts: a missing path, a directory that is not a run, or a
finished run without tokens ends with exit code 2 and one line on stderr. A RUN may be a URI
(s3://, gs://, ...), reached with the environment's credentials (`AWS_*` for S3) as
`routescope report` reaches it.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from routescope.dashboard.runs import check_run_path

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directories or URIs (s3://...) to serve (only these can be opened)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050)")
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="open runs with corrupt or truncated parts without them (the rest stays consistent)",
    )


def check_runs(paths: list[str], skip_corrupt: bool = False) -> str | None:
    """None when every path is a run the dashboard can show, else the first problem."""
    import routescope as rs

    for path in paths:
        problem = check_run_path(path, skip_corrupt)
        if problem:
            return problem
        with rs.open_run(path, skip_corrupt=skip_corrupt) as run:
            if run.complete and not run.manifest.get("tokens"):
                return f"{path}: the run is complete but holds no tokens; there is nothing to show"
    return None


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_free(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError:
        return False
    return True


def dashboard_command(args: argparse.Namespace) -> int:
    """Check the runs, then serve them until interrupted; 2 on bad input."""
    if not 0 < args.port < 65536:
        print(f"routescope dashboard: --port {args.port} is not a port number (1-65535)", file=sys.stderr)
        return 2
    skip = getattr(args, "skip_corrupt", False)
    problem = check_runs(args.runs, skip)
    if problem:
        print(f"routescope dashboard: {problem}", file=sys.stderr)
        return 2
    if not port_free(args.host, args.port):
        print(
            f"routescope dashboard: cannot listen on {args.host}:{args.port} (in use or not an address here); "
            "pass another --port",
            file=sys.stderr,
        )
        return 2
    import routescope as rs
    from routescope.dashboard.app import serve

    for path in args.runs:
        with rs.open_run(path, skip_corrupt=skip) as run:
            if run.skipped:
                print(f"note: {path}: {len(run.skipped)} corrupt part(s) skipped; the pages show the rest")
            elif not run.complete:
                print(f"note: {path} is still being written (or stopped early); the pages re-read it")
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}: anyone who can reach this address can view these runs")
    print(f"routescope dashboard: http://{args.host}:{args.port}/  (Ctrl+C to stop)")
    serve(args.runs, host=args.host, port=args.port, skip_corrupt=skip)
    return 0
