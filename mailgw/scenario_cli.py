"""``mailgw scenario check FILE...``: check scenario files the way the gateway reads them.

Prints ``file:line:column: message`` for every problem (the form editors and CI understand) and
exits 1 when there is one, 0 when every file is a valid scenario. Numbers the steps name and
``notify`` addresses are checked against the policy of ``--config`` (default: embedded defaults).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import load_config
from .scenario import Problem, ScenarioError, load_file, policy_problems

EX_PROBLEMS = 1


def register(subparsers: Any) -> None:
    scenario = subparsers.add_parser("scenario", help="check scenario files")
    actions = scenario.add_subparsers(dest="scenario_action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="print file:line:column: message for each problem")
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.add_argument("--config", type=Path, help="gateway.yaml whose policy numbers are checked against")
    check.set_defaults(run=_check)


def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    failed = False
    for path in args.files:
        problems = file_problems(path, config)
        for problem in problems:
            print(problem.show(str(path)))
        if not problems:
            print(f"{path}: ok", file=sys.stderr)
        failed = failed or bool(problems)
    return EX_PROBLEMS if failed else 0


def file_problems(path: Path, config: Any) -> list[Problem]:
    try:
        return policy_problems(load_file(path), config)
    except OSError as exc:
        return [Problem(None, f"cannot read: {exc.strerror}")]
    except UnicodeDecodeError:
        return [Problem(None, "not UTF-8 text")]
    except ScenarioError as exc:
        return exc.problems
