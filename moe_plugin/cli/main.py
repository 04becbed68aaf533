"""Entry point of the `moe-plugin` console script (also `python -m moe_plugin`).

Each subcommand is a module in this package exposing `HELP`, `add_arguments(parser)` and
`run(args) -> int`. Subcommands take Hydra-style overrides (`model=ling_lite model.num_layers=4`)
and `--json` for machine-readable output. A UserError (moe_plugin.errors) raised by a subcommand is printed
as one line and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from moe_plugin.errors import USER_ERROR_EXIT, UserError

SUBCOMMANDS = {
    "inspect": "moe_plugin.cli.inspect",
    "doctor": "moe_plugin.cli.doctor",
    "cost": "moe_plugin.cli.cost",
    "align": "moe_plugin.cli.align",
    "ckpt": "moe_plugin.cli.ckpt",
    "plan": "moe_plugin.cli.plan",
    "convert": "moe_plugin.cli.convert",
    "generate": "moe_plugin.cli.generate",
}


def _available() -> dict[str, object]:
    modules = {}
    for name, path in SUBCOMMANDS.items():
        try:
            modules[name] = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name != path:  # a real missing dependency inside the subcommand: surface it
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-plugin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _available().items():
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP)  # type: ignore[attr-defined]
        module.add_arguments(sp)  # type: ignore[attr-defined]
        sp.set_defaults(_run=module.run)  # type: ignore[attr-defined]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    # Overrides may follow options (`cost model=x --compare tokens=1e12`); argparse leaves those over.
    if rest:
        if any(r.startswith("-") for r in rest) or not isinstance(getattr(args, "overrides", None), list):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    try:
        return int(args._run(args) or 0)
    except UserError as err:  # bad input: one line, status 2, no traceback
        print(f"moe-plugin {args.command}: {err}", file=sys.stderr)
        return USER_ERROR_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
