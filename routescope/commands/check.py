"""`routescope check RUN`: verify a run's invariants (SPEC 3.2) and say what is wrong.

Exit codes: 0 every invariant holds; 1 the run is damaged (repeated keys, missing routing
rows, a manifest that disagrees with its parts, corrupt parts); 2 bad input (no such path,
not a run), as every command. The checks are `Run.verify()` (analysis/verify.py). RUN may be
a URI (s3://, gs://, ...), reached with the environment's credentials (`AWS_*` for S3), as
`routescope report` reaches it.
"""

from __future__ import annotations

import argparse
import json

EXIT_DAMAGED = 1


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory or URI (s3://, gs://, ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")


def check_command(args: argparse.Namespace) -> int:
    """Verify a run's invariants: unique keys, k rows per token and layer, manifest counts."""
    from routescope.analysis.verify import verify_run

    result = verify_run(args.run)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(result)
        for problem in result.problems:
            for example in problem.examples:
                print(f"      {problem.check} e.g. {example}")
    return 0 if result.ok else EXIT_DAMAGED


__all__ = ["EXIT_DAMAGED", "add_check_arguments", "check_command"]
