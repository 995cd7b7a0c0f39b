"""Canary for the next transformers release: does routescope still record every MoE type exactly?

Installs a transformers release (default: the newest on the package index) into a throwaway
venv beside the project's other dependencies, lists the MoE model types that are new since
the verified table (routescope/capture/verified.json), runs the capture, coverage and replay
tests against it, and prints one line per model type: records exactly, fails, or no tiny
config (the test could not build it). Run it at the start of each piece of work:

    python scripts/check_transformers.py                 # newest release, table of new/failing types
    python scripts/check_transformers.py --version 5.26.0 --all --strict
    python scripts/check_transformers.py --write-table   # after fixing: record the verified types

It exits non-zero only with --strict (some type fails or has no tiny config) or when the
venv cannot be set up. Raising pyproject's transformers bound is a separate, deliberate
change that comes with this script's clean run (and `--write-table`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "routescope" / "capture" / "verified.json"
TESTS = ["tests/test_capture.py", "tests/test_model_coverage.py", "tests/test_replay.py"]
# the parametrized tests whose id is a model type: record (coverage) and replay
RECORD_TEST = "test_model_type_records_exactly"
REPLAY_TEST = "test_every_installed_moe_type_replays_or_says_why"

# what the venv's own transformers holds: the types the tests verify there
LIST_TYPES = """
import json, transformers
from tests.moe_types import installed_moe_types
from tests.test_model_coverage import GAPS
from tests.test_multimodal import MULTIMODAL_GAPS, MULTIMODAL_TYPES
from tests.test_replay import NOT_REPLAYABLE, ROUTER_WEIGHT_GAPS
from tests.tiny_models import SEQ2SEQ
from transformers import AutoConfig
# the causal LM a test builds carries its text config's type (llama4 -> llama4_text)
recorded = {t: AutoConfig.for_model(t).get_text_config().model_type for t in installed_moe_types()}
print(json.dumps({
    "recorded_types": recorded,
    "version": transformers.__version__,
    "causal": installed_moe_types(),
    "gaps": sorted(GAPS),
    "multimodal": [t for t in MULTIMODAL_TYPES if t not in MULTIMODAL_GAPS],
    "seq2seq": sorted(SEQ2SEQ),
    "not_replayable": sorted(NOT_REPLAYABLE),
    "recorded_weights_only": sorted(ROUTER_WEIGHT_GAPS),
}))
"""


def newest_release() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"transformers \(([^)]+)\)", out)
    if not found:
        raise SystemExit(f"check_transformers: cannot read the newest release from pip: {out[:200]!r}")
    return found.group(1)


def make_venv(path: Path, version: str) -> Path:
    """A venv with this machine's torch, the project's other dependencies and `version`."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    import torch  # the same build as here (a CPU build stays a CPU build)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not re.match(r"(torch|transformers)\b", d)]
    deps += project["optional-dependencies"]["test"]
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]

    def install(*what: str) -> None:
        done = subprocess.run([*pip, *what], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(
                f"check_transformers: pip install {' '.join(what)} failed:\n{done.stderr[-2000:]}"
            )

    print(f"check_transformers: venv {path}: torch {torch.__version__}, transformers {version}", flush=True)
    install(f"torch=={torch.__version__.split('+')[0]}")
    install(f"transformers=={version}", *deps)
    # the project itself without its pins: its bound would refuse an unverified transformers
    install("--no-deps", "-e", str(ROOT))
    return python


def outcomes(junit: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(test name, model type) -> (passed | failed | skipped | xfail, first line of the failure)."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        found = re.match(r"(\w+)\[([^\]]+)\]", case.get("name", ""))
        if not found:
            continue
        state, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                state, text = "failed", (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                state = (
                    "xfail"
                    if "xfail" in (child.get("type") or "") + (child.get("message") or "")
                    else "skipped"
                )
        result[(found.group(1), found.group(2))] = (state, text)
    return result


def verdict(state: str, text: str) -> str:
    if state == "passed":
        return "records exactly"
    if state == "xfail":
        return "listed gap"
    if state == "skipped":
        return "skipped"
    built = "tiny_models.py" in text and ("tiny_config" in text or "build_tiny" in text)
    if built and ("Validation" in text or "ValueError" in text or "TypeError" in text):
        return "no tiny config"
    return "fails"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="transformers release to try (default: the newest)")
    parser.add_argument("--venv", type=Path, help="reuse this venv (default: a new temporary one)")
    parser.add_argument(
        "--all", action="store_true", help="list every MoE type, not only new or failing ones"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a type fails or has no tiny config"
    )
    parser.add_argument(
        "--write-table", action="store_true", help="rewrite verified.json from this run (only when all pass)"
    )
    args = parser.parse_args(argv)
    version = args.version or newest_release()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="routescope-canary-")) / "venv"
    python = make_venv(venv, version)
    listed = json.loads(
        subprocess.run(
            [str(python), "-c", LIST_TYPES], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    )
    table = json.loads(TABLE.read_text())
    known = set(table["model_types"])
    recorded = listed["recorded_types"]
    types = sorted(set(listed["causal"]) | set(listed["multimodal"]) | set(listed["seq2seq"]))
    new = [t for t in types if recorded.get(t, t) not in known]
    print(
        f"transformers {listed['version']}: {len(types)} MoE types, {len(new)} new since the verified table "
        f"({table['transformers']['oldest']} to {table['transformers']['newest']}): {', '.join(new) or 'none'}"
    )

    junit = venv.parent / "canary.xml"
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{python.parent}:{os.environ.get('PATH', '')}"},
    )
    print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:])
    results = outcomes(junit) if junit.exists() else {}
    other_failures = sorted(
        {name for (name, _), (state, _) in results.items() if state == "failed"} - {RECORD_TEST, REPLAY_TEST}
    )

    rows, bad = [], []
    for model_type in listed["causal"]:
        record = verdict(*results.get((RECORD_TEST, model_type), ("skipped", "")))
        replay = verdict(*results.get((REPLAY_TEST, model_type), ("skipped", "")))
        if replay == "records exactly":  # the test passed: it replays, or refuses as listed
            if model_type in listed["not_replayable"]:
                replay = "refused (listed gap)"
            elif model_type in listed["recorded_weights_only"]:
                replay = "weights='recorded' only (listed)"
            else:
                replay = "replays"
        is_new = recorded.get(model_type, model_type) not in known
        if record in ("fails", "no tiny config") or replay == "fails":
            bad.append(model_type)
        if args.all or is_new or model_type in bad:
            rows.append((model_type, "new" if is_new else "", record, replay))
    width = max([len(r[0]) for r in rows] + [10])
    print(f"\n{'model type':<{width}}  {'':3}  {'record':<16}  replay")
    for model_type, tag, record, replay in rows:
        print(f"{model_type:<{width}}  {tag:3}  {record:<16}  {replay}")
    if not rows:
        print("(no new or failing type)")
    if other_failures:
        print(f"\nother failing tests: {', '.join(other_failures)}")
    if args.write_table:
        if bad or other_failures:
            print("\nverified.json not written: some tests fail")
        else:
            minor = ".".join(listed["version"].split(".")[:2])
            table["transformers"]["newest"] = max(
                table["transformers"]["newest"], minor, key=lambda v: tuple(map(int, v.split(".")))
            )
            verified = (
                {listed["recorded_types"][t] for t in listed["causal"] if t not in listed["gaps"]}
                | set(listed["multimodal"])
                | set(listed["seq2seq"])
            )
            table["model_types"] = sorted(verified)
            TABLE.write_text(json.dumps(table, indent=1) + "\n")
            print(
                f"\nwrote {TABLE.relative_to(ROOT)}: newest {table['transformers']['newest']}, {len(verified)} types; "
                "now raise pyproject's transformers bound to match"
            )
    return 1 if args.strict and (bad or other_failures) else 0


if __name__ == "__main__":
    sys.exit(main())
