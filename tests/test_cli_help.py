"""Every argument of every `d2v` command says in `--help` what it is for."""
from __future__ import annotations

import argparse


def _without_help(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                missing += _without_help(subparser, f"{name} {sub}")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{name}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_has_a_line_of_help():
    from flows.cli import build_parser

    assert _without_help(build_parser(), "d2v") == []
