"""`vprkit <verb> ...`: argument parsing only; each verb lives in its own module.

A verb module defines `add_arguments(parser)` and `run(args) -> int`, or, for several verbs,
`COMMANDS = {verb: (add_arguments, run)}`. Modules are imported only when their verb runs, so
`vprkit --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("vprkit.demo", "the main job: synthetic city, train from scratch, evaluate"),
    "models": ("vprkit.models.registry", "list the registered model names"),
    "weights": ("vprkit.hub", "list, download and verify official weight files"),
    "eval": ("vprkit.evaluate", "evaluate a model on a benchmark: Recall@N, results, pictures"),
    "extract": ("vprkit.stage_commands", "stage 1: global (and local) descriptors of images"),
    "retrieve": ("vprkit.stage_commands", "stage 2: each query's nearest database images"),
    "rerank": ("vprkit.stage_commands", "stage 3: re-order candidates with local features"),
    "score": ("vprkit.stage_commands", "stage 4: Recall@N of predictions against ground truth"),
    "train": ("vprkit.train.loop", "train a method (one loop; torchrun for several processes)"),
    "synth": ("vprkit.data.synthetic", "generate synthetic places (GSV-Cities and VG formats)"),
    "mine": ("vprkit.mine", "pre-compute hard negatives for training (R2Former's file)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vprkit", description="Visual place recognition toolkit.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        # Arguments are added lazily below, only for the verb being run.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb in VERBS:
        add_arguments, _ = _verb_functions(verb)
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        add_arguments(sub_action.choices[verb])
    args = parser.parse_args(argv)
    args._command = shlex.join(["vprkit", *argv])  # for the run folders' logs
    _, run = _verb_functions(args.verb)
    return int(run(args) or 0)


def _verb_functions(verb: str):
    module = importlib.import_module(VERBS[verb][0])
    commands = getattr(module, "COMMANDS", None)
    return commands[verb] if commands else (module.add_arguments, module.run)


if __name__ == "__main__":
    sys.exit(main())
