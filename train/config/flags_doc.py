"""The flags reference, docs/flags.md, rendered from the parsers themselves.

    python -m train.config.flags_doc     (re)writes docs/flags.md

tests/unit/test_docs.py fails when docs/flags.md is not what this renders, so no flag is left out of it.
"""

import argparse
from pathlib import Path

from train.config.args import REPO, build_parser

FLAGS_DOC = REPO / "docs" / "flags.md"
HEADER = """# Flags

Generated from the argparse parsers by `python -m train.config.flags_doc`; do not edit by hand
(`tests/unit/test_docs.py` fails when this page and `--help` disagree). Batch sizes, precision, ZeRO,
optimizer, LR schedule and clipping are not flags: they live in the DeepSpeed JSON
([pipeline.md](pipeline.md#deepspeed-configs-ds_configs)).

`train.main`, `train.prepare` (the same parser) and `train.plan` share the model, LoRA and layout flags
with the same defaults; the planner adds the cluster flags and `--data-format` at the end. `train.export` and
`train.generate` are described in [checkpoints.md](checkpoints.md).
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "\\<")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "switch"
    if action.choices:
        kind = " \\| ".join(f"`{choice}`" for choice in action.choices)
    else:
        kind = {int: "int", float: "number", Path: "path"}.get(action.type, "text")
    return f"{kind} …" if action.nargs in ("+", "*") else kind


def _default(action: argparse.Action) -> str:
    value = action.default
    if action.nargs == 0:
        return "off" if not value else "on"
    if value is None or value == []:
        return "–"
    if isinstance(value, (str, Path)) and Path(value).is_absolute() and Path(value).is_relative_to(REPO):
        value = Path(value).relative_to(REPO)
    return f"`{value}`"


def _group_table(title: str, actions: list[argparse.Action]) -> str:
    rows = [
        f"| {', '.join(f'`{s}`' for s in a.option_strings)} | {_value(a)} | {_default(a)} | {_cell(a.help or '')} |"
        for a in actions
    ]
    return "\n".join([f"## {title}", "", "| flag | value | default | meaning |", "| --- | --- | --- | --- |", *rows])


def _groups(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> list[str]:
    tables = []
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if a.option_strings and a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        ]
        if actions and group.title not in skip:
            tables.append(_group_table(group.title, actions))
    return tables


def render() -> str:
    """docs/flags.md as the parsers define the flags now."""
    # train.plan is imported here: its parser is the trainer's shared flags plus the cluster group.
    from train.plan import build_parser as plan_parser

    trainer = build_parser()
    shared = {group.title for group in trainer._action_groups}
    planner = [t.replace("## ", "## train.plan: ", 1) for t in _groups(plan_parser(), skip=shared)]
    return "\n\n".join([HEADER.rstrip(), *_groups(trainer), *planner]) + "\n"


def main() -> None:
    FLAGS_DOC.write_text(render())
    print(f"wrote {FLAGS_DOC.relative_to(REPO)}")


if __name__ == "__main__":
    main()
